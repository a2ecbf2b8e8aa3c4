"""Sharing the adaptive deltas between processes (Redis). Drafting never waits on anything in here."""
