"""The static-KV, fixed-width verifier (and its compiled pass) with the real SmolLM2 in fp32: greedy outputs
equal plain decoding by ``model.generate`` and the eager path's, speculative or not."""
import numpy as np
import pytest
import torch

from aded_ray.decode import FixedBudget, GenerationStats, generate_ids
from aded_ray.draft.best import BestDrafter
from aded_ray.draft.build import matrix_from_token_docs
from aded_ray.draft.tree import DraftTree
from aded_ray.verify.static import StaticTreeVerifier
from aded_ray.verify.target import TreeVerifier

pytestmark = pytest.mark.model

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "List three fruits.",
    "def fibonacci(n):",
]
NEW = 40


def concurrent_greedy_equals_generate(engine, greedy_references) -> None:
    """The prompts above sent to ``engine`` at once (greedy, speculating): each output equals
    ``model.generate``'s; drafting happened (for other test files' engines: compiled, other modes)."""
    import threading

    refs = greedy_references(PROMPTS, NEW)
    outs, drafted = {}, []

    def go(i):
        chunks = list(engine.generate(refs[i][0], max_new_tokens=NEW))
        outs[i] = [t for c in chunks for t in c.token_ids]
        drafted.append(chunks[-1].stats.draft_tokens)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(refs))]
    [t.start() for t in threads]
    [t.join(600) for t in threads]
    assert [outs.get(i) for i in range(len(refs))] == [r for _, r in refs]
    assert sum(drafted) > 0


@pytest.fixture(scope="module")
def references(greedy_references):
    return greedy_references(PROMPTS, NEW)


def _decode(verifier, matrix, references, eos, nodes: int):
    """Greedy outputs of every reference prompt through ``verifier`` (``nodes`` draft nodes a step), and the
    accepted tokens in all."""
    outs, accepted = [], 0
    matrix.reset_deltas()
    drafter = BestDrafter(matrix)
    for ids, _ in references:
        st = GenerationStats()
        outs.append([t for c in generate_ids(verifier, drafter, ids, max_new_tokens=NEW, eos_ids=eos,
                                             budget=FixedBudget(nodes), stats=st) for t in c])
        accepted += st.accepted_tokens
    return outs, accepted


def _perfect(tokenizer, references):
    return matrix_from_token_docs([ids + out for ids, out in references], len(tokenizer))


def test_static_verifier_greedy_equals_generate_plain_and_speculative(model, tokenizer, corpus_matrix,
                                                                      references):
    eos = [tokenizer.eos_token_id]
    refs = [out for _, out in references]
    # widths (1, 8, 16): the prompts (> 16 tokens) run in several padded chunks; trees pad to 8 or 16
    v = StaticTreeVerifier(model, widths=(1, 8, 16), max_len=256)
    assert _decode(v, corpus_matrix, references, eos, nodes=0)[0] == refs
    assert _decode(v, corpus_matrix, references, eos, nodes=15)[0] == refs
    outs, accepted = _decode(v, _perfect(tokenizer, references), references, eos, nodes=15)
    assert outs == refs
    assert accepted > len(references) * NEW // 2        # long accepted paths (KV compaction) were exercised


@torch.inference_mode()
def test_static_rows_equal_the_dynamic_verifiers(model):
    """Prefill in padded chunks, a branching tree padded to its width, compaction, then a plain step: every
    row agrees with the dynamic-cache verifier to fp32 rounding, with the same argmax."""
    ids = list(range(1000, 1045))                      # 45 tokens: chunks of 16, 16, 13 (padded to 16)
    tree = DraftTree(np.array([5, 6, 7, 8, 9]), np.array([-1, -1, 0, 0, 2]))
    ref, st = TreeVerifier(model), StaticTreeVerifier(model, widths=(1, 8, 16), max_len=128)
    pairs = [(ref.prefill(ids)[None], st.prefill(ids)[None]), (ref.forward_tree(3, tree), st.forward_tree(3, tree))]
    ref.commit([0, 1, 3])
    st.commit([0, 1, 3])
    assert st.length == ref.length == 48
    pairs.append((ref.forward_tree(4, DraftTree()), st.forward_tree(4, DraftTree())))
    for a, b in pairs:
        assert a.shape == b.shape
        assert float((a - b).abs().max()) < 1e-3
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_static_verifier_refuses_what_does_not_fit(model):
    v = StaticTreeVerifier(model, widths=(1, 8), max_len=32)
    with pytest.raises(ValueError, match="max_len=32"):
        v.prefill(list(range(100, 130)))                # 30 prompt tokens + a pass of 8 > 32
    v.prefill(list(range(100, 120)))
    with pytest.raises(ValueError, match="largest fixed width 8"):
        v.forward_tree(1, DraftTree(np.arange(9), np.arange(-1, 8)))
    with pytest.raises(ValueError, match="widths"):
        StaticTreeVerifier(model, widths=(0, 4))


def test_compiled_passes_are_configured_for_one_request_and_weights_the_compiler_can_call():
    from pydantic import ValidationError

    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.verify.modes import preferred_cpu_mode

    # the graphs call fp32-mkl's packed linears (one copy of the weights for every shape) where the machine's
    # probe chose that mode (the Xeon; not the AMD EPYC, where MKL is slower and not row-invariant), else fp32
    mkl = preferred_cpu_mode() == "fp32-mkl"
    assert VerifyConfig(compile=True).resolved_mode() == ("fp32-mkl" if mkl else "fp32")
    assert VerifyConfig(compile=True).resolved_widths() == [1, 2, 4, 8, 16]           # CPU: small trees pay
    assert VerifyConfig(compile=True, widths=[64, 1]).resolved_widths() == [1, 64]
    assert EngineConfig(verify=VerifyConfig(compile=True)).compiled_batched      # batched: per token bucket
    assert not EngineConfig(verify=VerifyConfig(compile=True), max_batch=1).compiled_batched
    assert VerifyConfig(compile=True).resolved_compile_tokens() == [1, 2, 4, 8, 16, 32]
    with pytest.raises(ValidationError, match=r"fixed widths \[1, 8\] apply only to max_batch 1"):
        EngineConfig(verify=VerifyConfig(compile=True, widths=[1, 8]))
    with pytest.raises(ValidationError, match=r"compile_tokens \[0, 8\] must be one or more token counts"):
        VerifyConfig(compile=True, compile_tokens=[0, 8])
    with pytest.raises(ValidationError, match="'fp32-packed'"):
        VerifyConfig(compile=True, mode="fp32-packed")
    with pytest.raises(ValidationError, match="tp_size is 2"):
        VerifyConfig(compile=True, tp_size=2)


@pytest.mark.slow
def test_engine_with_compiled_passes_speculates_and_equals_generate(tokenizer, corpus_matrix, references):
    """``verify.compile``: the engine's requests run through compiled static passes (one at a time), draft,
    and decode exactly what ``model.generate`` decodes; and the same compiled graphs (torch.compile, inductor
    on CPUs, over the fixed widths), driven plain, speculating on the corpus store and on a store that knows
    the answers (long accepted paths: KV compaction inside the graphs), decode what the eager static path and
    ``model.generate`` decode (the eager static path equals ``model.generate`` on these prompts and settings:
    :func:`test_static_verifier_greedy_equals_generate_plain_and_speculative`). One compile for both: two
    widths take ~3 min of compiling on the 2-core EPYC, and a second model object would double it."""
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine
    from aded_ray.verify.static import StaticTreeVerifier

    # a serving process compiles one model; had this test process compiled another SmolLM2 object, dynamo's
    # per-code state would mark every size that differs as dynamic (~2x the compile time)
    torch._dynamo.reset()
    e = Engine(EngineConfig(verify=VerifyConfig(compile=True, widths=[1, 8]), max_batch=1))   # 2 shapes: quick
    try:
        assert e.speculate and e.widths == [1, 8] and e.max_nodes == 7
        compiled = e.make_verifier()
        assert isinstance(compiled, StaticTreeVerifier)
        assert compiled.compiled and compiled._fn is not e.model.forward
        drafted = 0
        for ids, ref in references:
            chunks = list(e.generate(ids, max_new_tokens=NEW))
            assert [t for c in chunks for t in c.token_ids] == ref
            drafted += chunks[-1].stats.draft_tokens
        assert drafted > 0
        eos, refs = [tokenizer.eos_token_id], [out for _, out in references]
        eager = StaticTreeVerifier(e.model, widths=(1, 8), max_len=256)
        for nodes, matrix in ((0, corpus_matrix), (7, corpus_matrix), (7, _perfect(tokenizer, references))):
            want = _decode(eager, matrix, references, eos, nodes)[0]
            assert want == refs
            assert _decode(compiled, matrix, references, eos, nodes)[0] == want
    finally:
        e.shutdown()


def test_serve_args_select_compiled_passes():
    from aded_ray.serve.args import AppArgs

    cfg = AppArgs(compile=True, max_running=1).engine_config()
    assert cfg.verify.compile and cfg.max_batch == 1 and cfg.verify.resolved_widths() == [1, 2, 4, 8, 16]
    assert not AppArgs().engine_config().verify.compile
    batched = AppArgs(compile=True).engine_config()
    assert batched.max_batch == 4 and batched.compiled_batched
    assert AppArgs(compile=True, compile_tokens=[8, 4]).engine_config().verify.resolved_compile_tokens() == [4, 8]
