"""Benchmarks: trace recording and trace replay (drafter quality and speed without the model)."""
