"""Record traces: the target model's greedy continuation of evaluation prompts, as token ids.

A trace line is ``{"id", "prompt_ids": [...], "output_ids": [...]}``. Prompts are batched (left padding)
to make recording affordable on a CPU; batched fp32 greedy decoding can break a rare near-tie differently
from one-at-a-time decoding, which does not matter for replaying drafters over the traces.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from aded_ray.data import load_prompts


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat request with the model's template and the assistant prefix."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(out, dict) or hasattr(out, "keys"):
        out = out["input_ids"]
    return list(out)


def record_traces(*, prompts: str, out: str | Path, model: str | None = None, limit: int | None = None,
                  max_new_tokens: int = 256, batch_size: int = 8, dtype: str = "float32", spread: bool = False) -> int:
    """Greedy-decode every prompt of ``prompts`` and write one trace per line to ``out``. With ``spread``,
    ``limit`` prompts are taken evenly over the whole set instead of its first ``limit``."""
    import torch

    from aded_ray.verify.loading import load_model, load_tokenizer

    tok = load_tokenizer(model)
    lm = load_model(model, dtype=dtype)
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    chosen = spread_pick(load_prompts(prompts), limit) if spread else load_prompts(prompts, limit)
    rows = [(p["id"], chat_ids(tok, p["messages"])) for p in chosen]
    rows.sort(key=lambda r: len(r[1]))  # similar lengths per batch: less padding
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    t0, n_tok = time.perf_counter(), 0
    with open(out, "w") as fh, torch.inference_mode():
        for i in tqdm(range(0, len(rows), batch_size), desc=f"record {prompts}", unit="batch"):
            batch = rows[i:i + batch_size]
            width = max(len(ids) for _, ids in batch)
            ids = torch.tensor([[pad] * (width - len(x)) + x for _, x in batch])
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for _, x in batch])
            gen = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=pad, eos_token_id=eos)
            for (rid, prompt_ids), row in zip(batch, gen[:, width:].tolist()):
                if eos in row:
                    row = row[:row.index(eos) + 1]
                n_tok += len(row)
                fh.write(json.dumps({"id": rid, "prompt_ids": prompt_ids, "output_ids": row}) + "\n")
    dt = time.perf_counter() - t0
    print(f"recorded {len(rows)} traces, {n_tok} tokens in {dt:.0f} s ({n_tok / dt:.1f} tok/s) -> {out}")
    return len(rows)


def spread_pick(items: list, n: int | None) -> list:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` is None or not smaller).

    >>> spread_pick(list(range(10)), 3)
    [0, 3, 6]
    """
    if n is None or len(items) <= n:
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def load_traces(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
