"""The seams of the decode step, written down: what a drafter, a verifier and a budget must provide.

The decode loop (:mod:`aded_ray.decode`) and the engine use these alone, so a fake verifier (literal logits)
or a fake drafter can drive them in unit tests, and the in-process verifier and the tensor-parallel group's
are interchangeable.
"""
from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from aded_ray.draft.tree import DraftTree


@runtime_checkable
class Drafter(Protocol):
    def observe(self, seq: np.ndarray) -> None:
        """The committed tokens of the request so far (the adaptive update sees verified tokens only)."""

    def draft(self, seq: np.ndarray, max_nodes: int | None = None) -> DraftTree:
        """A breadth-first tree of at most ``max_nodes`` nodes below the last token of ``seq``."""


@runtime_checkable
class StepDrafter(Drafter, Protocol):
    def observe_draft(self, seq: np.ndarray, max_nodes: int | None = None) -> DraftTree:
        """``observe(seq)`` then ``draft(seq, max_nodes)`` in one call, the decode loop's per-step form: the same
        state and tree as the two calls. The tree may live in the drafter's buffers, valid until its next
        ``observe_draft``."""


@runtime_checkable
class RecyclingDrafter(Drafter, Protocol):
    def observe_logits(self, prev: np.ndarray, inputs: np.ndarray, top_ids: np.ndarray,
                       top_p: np.ndarray) -> None:
        """The model's top-k next tokens (``[rows, k]`` ids and probabilities, on the host) after each input
        token ``inputs[i]`` whose previous token is ``prev[i]``."""


@runtime_checkable
class TreeRecyclingDrafter(RecyclingDrafter, Protocol):
    def observe_tree_logits(self, before_root: int, root: int, tokens: np.ndarray, parents: np.ndarray,
                            top_ids: np.ndarray, top_p: np.ndarray) -> None:
        """:meth:`observe_logits` for one verified tree, the decode loop's per-step form: row 0 follows
        ``before_root, root``, row ``i + 1`` node ``i`` (``tokens``/``parents`` of a
        :class:`~aded_ray.draft.tree.DraftTree`); the contexts are implied by the tree, so no array is built."""


@runtime_checkable
class Verifier(Protocol):
    """One request's view of the target model and its KV cache (committed tokens only between steps)."""

    length: int

    def prefill(self, ids: Sequence[int]):
        """Run the prompt; ``[V]`` logits (a tensor on the model's device) for the position after it."""

    def forward_tree(self, root: int, tree: DraftTree):
        """``[N + 1, V]`` logits on the model's device for the root and every node."""

    def commit(self, keep: Sequence[int]) -> None:
        """Keep the step's entries ``keep`` (0 = root, i + 1 = node i, in path order), drop the rest."""


@runtime_checkable
class Budget(Protocol):
    def choose(self, batch: int = 1, reqs=None) -> int:
        """Draft nodes per request for the next step of ``batch`` running requests (0 = a plain step);
        ``reqs``: each request's acceptance record (from ``request_state()``, if the budget keeps them;
        None for a request that does not speculate). For a padded pass: every request pads to it."""

    def allot(self, reqs: list, caps: list[int]) -> list[int]:
        """Draft nodes for each request of the next step (``caps[r]``: request r's own limit, 0 when it does
        not speculate), for a pass that pads nothing: each request's tree costs only its own tokens."""

    def observe(self, budget: int, n_nodes: int, path: list[int], req=None) -> None:
        """A verified step drafted with ``budget``: ``n_nodes`` drafted, ranks of the accepted nodes (and
        the request's acceptance record)."""

    def observe_cost(self, batch: int, width: int, ms: float) -> None:
        """A pass of ``batch`` requests x ``width`` tokens each (on average, in a ragged pass) took ``ms``
        (synchronised)."""
