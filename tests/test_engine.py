"""The engine end to end on the real model: modes, budgets, stops, limits and bad input."""
import pytest

from aded_ray.config import DraftConfig, EngineConfig, VerifyConfig
from aded_ray.engine import Engine

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    store = tmp_path_factory.mktemp("store") / "s.tri"
    from aded_ray.draft.matrix import TrigramMatrix

    TrigramMatrix.empty(49152).save(store)
    return Engine(EngineConfig(store=str(store), verify=VerifyConfig(budget="auto")))     # the default mode


def ids_of(chunks):
    return [t for c in chunks for t in c.token_ids]


def test_default_mode_is_exact_and_speculation_is_lossless(engine):
    assert engine.mode == VerifyConfig(device="cpu").resolved_mode() and engine.exact and engine.speculate
    prompt = "Rewrite this sentence in the passive voice: the cat chased the mouse around the house."
    auto = list(engine.generate(prompt, chat=True, max_new_tokens=48))          # the engine's own budget
    plain = list(engine.generate(prompt, chat=True, max_new_tokens=48, speculate=False))
    engine.reconfigure(budget=16)      # drafting on for sure (the auto budget may judge it not worth a pass here)
    try:
        spec = list(engine.generate(prompt, chat=True, max_new_tokens=48))
    finally:
        engine.reconfigure(budget="auto")
    assert ids_of(spec) == ids_of(plain) == ids_of(auto)
    assert "".join(c.text for c in spec) == "".join(c.text for c in plain)
    assert spec[-1].finish_reason in ("stop", "length")
    st, pst = spec[-1].stats, plain[-1].stats
    assert pst.drafts == 0 and pst.accepted_tokens == 0 and st.emitted == pst.emitted == len(ids_of(plain))
    assert st.drafts > 0 and st.draft_tokens > 0 and st.accepted_tokens > 0   # drafting happened and paid off
    assert st.steps < pst.steps                                        # accepted tokens saved passes
    snap = engine.budget.snapshot()
    assert snap["cost_ms"][1][1] > 0 and 0 <= snap["best"] <= 63          # ms of a 1-request, 1-token pass


def test_one_thread_builds_the_model_and_runs_every_pass(engine):
    # a second thread running tensor work gives the process a second OpenMP pool: on CPUs every pass slows down
    import threading

    kv, seen = engine.scheduler.kv, set()
    passes, prefill = kv.forward_trees, kv.prefill
    kv.forward_trees = lambda *a, **k: seen.add(threading.current_thread()) or passes(*a, **k)
    kv.prefill = lambda *a, **k: seen.add(threading.current_thread()) or prefill(*a, **k)
    try:
        list(engine.generate("Say hello.", chat=True, max_new_tokens=6))
    finally:
        del kv.forward_trees, kv.prefill
    assert seen == {engine.compute_thread} and engine.compute_thread is not threading.current_thread()
    assert engine.compute_thread.name == "aded-scheduler"


def test_the_template_preamble_is_prefilled_once_and_its_kv_reused(engine):
    msgs = [{"role": "user", "content": "Name three rivers in Europe."}]
    ids = engine.encode(msgs)
    n = engine.preamble_length(ids)
    text = engine.tokenizer.decode(ids[:n])
    assert n > 0 and "Name" not in text and text.endswith("user\n")          # the template's text alone
    assert engine.preamble_length(engine.encode([{"role": "system", "content": "Be brief."}] + msgs)) == 0
    kv, ran = engine.scheduler.kv, []
    prefill = kv.prefill

    def counted(slot, ids, start=0, max_tokens=None):
        out = prefill(slot, ids, start, max_tokens)
        ran.append((start, int(kv.lens[slot]) - start))
        return out

    kv.prefill = counted
    engine.scheduler._preamble = None
    try:
        outs = []
        for _ in range(2):
            ran.clear()
            outs.append((ids_of(engine.generate(msgs, max_new_tokens=24, speculate=False)), list(ran)))
    finally:
        del kv.prefill
    (first, miss), (second, hit) = outs
    assert miss == [(0, n), (n, len(ids) - n)]          # the preamble in a pass of its own, then the rest
    assert hit == [(n, len(ids) - n)]                    # its KV copied: only the rest runs
    assert first == second                               # the same KV either way: the same tokens


def test_max_new_tokens_and_stop_strings(engine):
    prompt = "Write a long essay about the history of the ocean."
    chunks = list(engine.generate(prompt, chat=True, max_new_tokens=30))
    text = "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "length" and len(ids_of(chunks)) == 30
    stop = text[20:24]                       # any 4 characters of the answer
    cut = text.find(stop)
    stopped = list(engine.generate(prompt, chat=True, max_new_tokens=30, stop=["never appears", stop]))
    assert "".join(c.text for c in stopped) == text[:cut]
    assert stopped[-1].finish_reason == "stop"


def test_sampling_is_seeded(engine):
    a = ids_of(engine.generate("Tell me a story.", chat=True, max_new_tokens=16, temperature=0.9, seed=3))
    b = ids_of(engine.generate("Tell me a story.", chat=True, max_new_tokens=16, temperature=0.9, seed=3))
    assert a == b


@pytest.mark.parametrize("kw, match", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10 ** 6}, "max_new_tokens"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -1}, "top_k"),
])
def test_bad_input_raises_value_error_and_engine_keeps_serving(engine, kw, match):
    with pytest.raises(ValueError, match=match):
        engine.generate("hi", **kw)
    assert ids_of(engine.generate("hi", max_new_tokens=2))


def test_prompt_limits(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.generate("")
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        engine.generate("word " * 5000)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="iterations"):
        DraftConfig(iterations=-1)
    with pytest.raises(ValueError, match="mode"):
        VerifyConfig(mode="int8")
    with pytest.raises(ValueError, match="unknown_field|extra"):
        EngineConfig(unknown_field=1)


def test_draft_config_defaults_match_the_drafter():
    import inspect

    from aded_ray.draft.mcts import MCTSDrafter

    sig = inspect.signature(MCTSDrafter.__init__).parameters
    for k, v in DraftConfig().mcts_kwargs().items():
        assert sig[k].default == v, k


def test_cost_curve_from_configuration_is_used(tmp_path):
    from aded_ray.draft.matrix import TrigramMatrix

    TrigramMatrix.empty(49152).save(tmp_path / "s.tri")
    e = Engine(EngineConfig(store=str(tmp_path / "s.tri"),
                            verify=VerifyConfig(mode="fp32", cost_curve={1: 30.0, 2: 300.0, 64: 3000.0})))
    assert e.budget.cost.to_dict() == {1: {1: 30.0, 2: 300.0, 64: 3000.0}}
    assert e.budget.best() == 0          # multi-token passes that expensive never pay: plain decoding
