"""Verification side: model loading, tree forward, acceptance (imports torch/transformers)."""
