"""build-store end to end on a small corpus with the real tokenizer, and the authors' drafter beside ours."""
import json

import numpy as np

from aded_ray.bench.replay import AuthorsDrafter, authors_replay, replay
from aded_ray.build_store import build_store
from aded_ray.cli import main
from aded_ray.data import iter_corpus
from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.draft.mcts import MCTSDrafter

TEXT = [
    "The quick brown fox jumps over the lazy dog. The quick brown fox is quick.",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n",
    "ok",
]


def test_build_store_from_jsonl(tmp_path, tokenizer, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in TEXT))
    assert list(iter_corpus(str(corpus))) == TEXT
    out = tmp_path / "s.tri"
    assert main(["build-store", "--corpus", str(corpus), "--out", str(out), "--authors-out",
                 str(tmp_path / "s.authors.idx"), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["documents"] == 2                 # "ok" is shorter than 3 tokens
    m = TrigramMatrix.load(out)
    assert m.meta["corpus"] == str(corpus) and len(m.meta["tokenizer"]) == 16
    ids = tokenizer(TEXT[1])["input_ids"]
    assert m.weight(ids[0], ids[1], ids[2]) > 0
    # the same tokens drafted by our MCTS and by the authors' Rust drafter
    trace = {"prompt_ids": ids[:3], "output_ids": ids[3:]}
    ours = replay([trace], MCTSDrafter(m)).mat
    theirs = replay([trace], AuthorsDrafter(tmp_path / "s.authors.idx")).mat
    assert ours > 1.5 and theirs > 1.5
    # the benches replay it in a child process (in theirs it slows the drafters timed after it)
    child = authors_replay([trace], tmp_path / "s.authors.idx", 64, "theirs")
    assert child["name"] == "theirs" and child["traces"] == 1 and abs(child["mat"] - theirs) < 0.5
    assert len(AuthorsDrafter(tmp_path / "s.authors.idx").draft([ids[0]])) == 0   # guarded: no abort


def test_corpus_errors():
    import pytest

    with pytest.raises(ValueError, match="nosuch"):
        next(iter_corpus("nosuch-corpus"))
    assert main(["build-store", "--corpus", "nosuch-corpus", "--out", "/tmp/x.tri", "--quiet"]) == 2


def test_builtin_corpora_are_readable():
    docs = list(iter_corpus("sharegpt", limit=5))
    assert len(docs) == 5 and all(isinstance(d, str) and d for d in docs)
    assert "def " in "".join(iter_corpus("stdlib", limit=3))
    np.testing.assert_equal(len(list(iter_corpus("stdlib", limit=2))), 2)


def test_distilled_outputs_are_counted_as_emitted_with_their_weight(tmp_path, tokenizer):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": TEXT[0]}))
    # the model's own ids, including a token sequence the tokenizer would not produce for this text
    distilled = tmp_path / "d.jsonl"
    distilled.write_text(json.dumps({"prompt_ids": [1, 2, 3, 4], "output_ids": [7, 1116, 33, 30]}))
    out = tmp_path / "s.tri"
    rep = build_store(corpus=str(corpus), out=out, distilled=distilled, distilled_weight=3, progress=False)
    m = TrigramMatrix.load(out)
    assert rep["distilled_tokens"] == 4 and m.meta["distilled_weight"] == 3
    # counted with the last two prompt tokens (the assistant header) in front: (3, 4) -> 7, (4, 7) -> 1116, ...
    for a, b, c in [(3, 4, 7), (4, 7, 1116), (7, 1116, 33), (1116, 33, 30)]:
        assert m.weight(a, b, c) == 1.0              # the only successor of that context
    import pytest

    with pytest.raises(ValueError, match="distilled_weight"):
        build_store(corpus=str(corpus), out=out, distilled=distilled, distilled_weight=0, progress=False)


def test_counter_times_equals_repeated_adds():
    from aded_ray.draft.build import TrigramCounter

    a, b = TrigramCounter(50), TrigramCounter(50)
    a.add([1, 2, 3, 4, 2, 3, 5], times=3)
    for _ in range(3):
        b.add([1, 2, 3, 4, 2, 3, 5])
    a._reduce(), b._reduce()
    assert a.codes.tolist() == b.codes.tolist() and a.counts.tolist() == b.counts.tolist()
    assert a.tokens == 7 and a.documents == 1
