"""Prompt sets and corpora: the dev prompts (ShareGPT first user turns) never contain an eval prompt."""
import re

from aded_ray.data import load_prompts, sharegpt_prompts


def _norm(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip().lower()


def test_sharegpt_dev_prompts_are_first_user_turns_disjoint_from_the_eval_sets():
    dev = sharegpt_prompts(limit=2000)
    assert len(dev) == 2000 and len({p["id"] for p in dev}) == 2000
    assert all(len(p["messages"]) == 1 and p["messages"][0]["role"] == "user" for p in dev)
    assert all(8 <= len(p["messages"][0]["content"]) <= 2000 for p in dev)
    blob = "\n".join(_norm(p["messages"][0]["content"]) for p in sharegpt_prompts())
    evals = [p["messages"][0]["content"] for p in load_prompts("mtbench")]
    # HumanEval prompts embed the function stub; check its docstring-bearing part
    evals += [p["messages"][0]["content"].split("```python\n", 1)[1] for p in load_prompts("humaneval")]
    hits = [e[:80] for e in evals if _norm(e)[:80] in blob]
    assert not hits, f"eval prompts found in the dev prompts: {hits[:3]}"
    assert load_prompts("sharegpt", limit=3) == dev[:3]
