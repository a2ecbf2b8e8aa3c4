"""Dev sets of different kinds, for measuring how the drafter generalizes (leave-one-set-out).

Every set is built from what ``make setup`` installs or the interpreter ships, nothing is downloaded:

- ``multiturn``: ShareGPT conversations cut after their second user turn (user, assistant, user), from
  conversations after the first 4,000 (the old prior-fitting prompts came from the first 4,000);
- ``summarize``: "summarize this text" over module docstrings of the Python standard library (prose);
- ``codeedit``: "add type hints and a docstring, keep the logic" over short standard-library functions
  (rewriting of a given text);
- ``writetests``: "write pytest tests for this function" over other standard-library functions.

Items are picked deterministically (sorted files, a fixed stride), so a set is the same on every machine
with the same interpreter. The standard library is not in the default (ShareGPT) store.
"""
from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

DEV_SETS = ("multiturn", "summarize", "codeedit", "writetests")
_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
         "encodings",
         "__phello__", "ensurepip", "pydoc_data"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [p for p in sorted(root.rglob("*.py")) if not _SKIP.intersection(p.relative_to(root).parts)]


def _ascii(text: str) -> bool:
    return sum(c.isascii() for c in text) >= 0.97 * len(text)


def _pick(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when fewer)."""
    if len(items) <= n:
        return items
    return [items[(i * len(items)) // n] for i in range(n)]


def _docstrings(min_chars: int = 500, max_chars: int = 1500) -> list[tuple[str, str]]:
    out = []
    for p in _stdlib_files():
        try:
            doc = ast.get_docstring(ast.parse(p.read_text(encoding="utf-8", errors="ignore")))
        except (SyntaxError, ValueError):
            continue
        if doc and min_chars <= len(doc) <= max_chars and _ascii(doc):
            out.append((p.stem, doc.strip()))
    return out


def _functions(min_lines: int = 6, max_lines: int = 18) -> list[tuple[str, str]]:
    """Top-level functions without a docstring, of ``min_lines..max_lines`` lines, one per file."""
    out = []
    for p in _stdlib_files():
        src = p.read_text(encoding="utf-8", errors="ignore")
        try:
            tree = ast.parse(src)
        except (SyntaxError, ValueError):
            continue
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) is None \
                    and not node.name.startswith("_") and min_lines <= node.end_lineno - node.lineno + 1 <= max_lines:
                code = ast.get_source_segment(src, node)
                if code and _ascii(code) and "\t" not in code:
                    out.append((f"{p.stem}.{node.name}", code))
                    break
    return out


def _request(i: int, name: str, content: str) -> dict:
    return {"id": f"{name}-{i}", "messages": [{"role": "user", "content": content}]}


def multiturn_prompts(limit: int = 24, skip: int = 4000) -> list[dict]:
    from aded_ray.data import _sharegpt_conversations

    cands = []
    for k, obj in enumerate(_sharegpt_conversations()):
        if k < skip:
            continue
        turns = [t for t in obj.get("conversations", ()) if t.get("from") != "system"]
        if len(turns) < 3 or [t.get("from") for t in turns[:3]] != ["human", "gpt", "human"]:
            continue
        texts = [(t.get("value") or "").strip() for t in turns[:3]]
        if not all(8 <= len(x) for x in texts) or sum(map(len, texts)) > 2500 or not _ascii("".join(texts)):
            continue
        cands.append({"id": f"multiturn-{obj.get('id', k)}", "messages": [
            {"role": "user", "content": texts[0]}, {"role": "assistant", "content": texts[1]},
            {"role": "user", "content": texts[2]}]})
        if len(cands) >= 40 * limit:
            break
    return _pick(cands, limit)


def summarize_prompts(limit: int = 24) -> list[dict]:
    docs = _pick(_docstrings(), limit)
    return [_request(i, "summarize", f"Summarize the following text in a few sentences.\n\n{doc}")
            for i, (_, doc) in enumerate(docs)]


def codeedit_prompts(limit: int = 24) -> list[dict]:
    funcs = _functions()[0::2]
    return [_request(i, "codeedit", "Add type hints and a docstring to this Python function, keeping its logic "
                     f"identical, and show the whole function.\n```python\n{code}\n```")
            for i, (_, code) in enumerate(_pick(funcs, limit))]


def writetests_prompts(limit: int = 24) -> list[dict]:
    funcs = _functions()[1::2]
    return [_request(i, "writetests", f"Write pytest unit tests for this Python function.\n```python\n{code}\n```")
            for i, (_, code) in enumerate(_pick(funcs, limit))]


def dev_prompts(name: str, limit: int | None = None) -> list[dict]:
    n = 24 if limit is None else limit
    fn = {"multiturn": multiturn_prompts, "summarize": summarize_prompts, "codeedit": codeedit_prompts,
          "writetests": writetests_prompts}[name]
    return fn(n)
