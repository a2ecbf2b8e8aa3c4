"""Drafting: tri-gram matrix (base + adaptive deltas), MCTS and lookup drafters, the draft tree.

Imports numpy and numba only: no torch, Redis or Ray here.
"""
from aded_ray.draft.tree import DraftTree

__all__ = ["DraftTree"]
