"""``aded build-store``: corpus -> target tokenizer -> tri-gram counts -> one store file.

Documents are tokenized in batches by the fast tokenizer (its Rust batch encoder uses every core) with the
tokenizer's default ``encode`` behaviour (special tokens as it adds them). Optionally writes the authors'
``draftretriever`` index from the very same token documents, for side-by-side benchmarks.
"""
from __future__ import annotations

import hashlib
import resource
import time
from pathlib import Path

from tqdm import tqdm

from aded_ray.data import iter_corpus
from aded_ray.draft.build import TrigramCounter


def tokenizer_id(tokenizer) -> str:
    """A short fingerprint of a tokenizer's vocabulary and merges: stores of different tokenizers never mix."""
    try:
        blob = tokenizer.backend_tokenizer.to_str()
    except AttributeError:
        blob = repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_store(*, corpus: str, out: str | Path, model: str | None = None, top_k: int = 12,
                limit: int | None = None, batch: int = 512, authors_out: str | Path | None = None,
                distilled: str | Path | None = None, distilled_weight: int = 8, progress: bool = True) -> dict:
    """Build a store from ``corpus`` and write it to ``out``; returns a report dict.

    ``distilled``: a trace file of the target model's own outputs (``aded record-traces``, e.g. ``--prompts sharegpt``); each output is counted
    ``distilled_weight`` times, as the token ids the model emitted (its own tokenization, which can differ
    from the tokenizer's encoding of the same text), together with the last two prompt tokens (the
    assistant header) so the opening of an answer is learned too.
    """
    from aded_ray.verify.loading import load_tokenizer

    t0 = time.perf_counter()
    tok = load_tokenizer(model)
    vocab = len(tok)
    counter = TrigramCounter(vocab)
    writer = None
    if authors_out is not None:
        import draftretriever

        writer = draftretriever.Writer(str(authors_out), vocab_size=vocab)
    docs = iter_corpus(corpus, limit)
    bar = tqdm(desc=f"build-store {corpus}", unit="doc", disable=not progress)
    pending: list[str] = []

    def flush():
        enc = tok(pending, add_special_tokens=True, return_attention_mask=False)["input_ids"]
        for ids in enc:
            counter.add(ids)
            if writer is not None and len(ids) >= 3:
                writer.add_entry(ids)
        bar.update(len(pending))
        bar.set_postfix(tokens=f"{counter.tokens / 1e6:.1f}M")
        pending.clear()

    for doc in docs:
        pending.append(doc)
        if len(pending) >= batch:
            flush()
    if pending:
        flush()
    bar.close()
    n_distilled = 0
    if distilled is not None:
        from aded_ray.bench.traces import load_traces

        if int(distilled_weight) < 1:
            raise ValueError(f"distilled_weight = {distilled_weight} must be >= 1")
        for tr in load_traces(distilled):
            ids = list(tr["prompt_ids"][-2:]) + list(tr["output_ids"])
            counter.add(ids, int(distilled_weight))
            if writer is not None and len(ids) >= 3:
                for _ in range(int(distilled_weight)):
                    writer.add_entry(ids)
            n_distilled += len(tr["output_ids"])
    if writer is not None:
        writer.finalize()
    meta = {"corpus": str(corpus), "tokenizer": tokenizer_id(tok), "model": str(model or "smollm2")}
    if distilled is not None:
        meta.update(distilled=str(distilled), distilled_weight=int(distilled_weight), distilled_tokens=n_distilled)
    matrix = counter.matrix(top_k, meta)
    size = matrix.save(out)
    report = {
        "out": str(out), "corpus": str(corpus), "documents": counter.documents, "tokens": counter.tokens,
        "distilled_tokens": n_distilled,
        "contexts": matrix.n_contexts, "entries": matrix.n_entries, "file_bytes": size,
        "build_s": round(time.perf_counter() - t0, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if authors_out is not None:
        report["authors_index_bytes"] = Path(authors_out).stat().st_size
    return report
