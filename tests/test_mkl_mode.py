"""``fp32-mkl``, the CPU default where a probe finds MKL's kernel no slower: linears packed once by MKL's sgemm.
A packed linear is the linear (literal weights and inputs); a row's result does not depend on how many rows
share the call, by construction (small calls padded to the fewest rows the probe finds it takes; SmolLM2's
linear shapes, random weights); the default follows the probe (cached per machine); the mode refuses what it
cannot run; and an engine in it decodes under load what each request decodes alone, greedy outputs equal to
``model.generate`` (the real SmolLM2)."""
import numpy as np
import pytest
import torch

from aded_ray.verify.modes import MklPackedLinear, mkl_available

pytestmark = pytest.mark.skipif(not mkl_available(), reason="this torch build has no MKL")


def test_packed_linear_is_the_linear_on_literal_values():
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]))
        lin.bias.copy_(torch.tensor([0.25, -4.0]))
    packed = MklPackedLinear(lin)
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    # [1+2+3+0.25, -1+0.5-4], [2-3+0.25, -2-4]
    assert packed(x).tolist() == [[6.25, -4.5], [-0.75, -6.0]]
    assert packed(x[None]).shape == (1, 2, 2) and packed(x[None])[0].tolist() == packed(x).tolist()   # [B, T, K]
    assert packed(x[:1]).tolist() == [[6.25, -4.5]]                                                  # a lone row
    assert not hasattr(packed, "weight") and packed.stand_in.shape == (2, 3)   # a stand-in, never read


def _kind(mode):
    from aded_ray.verify.modes import PackedLinear

    if mode == "fp32-packed" and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    return MklPackedLinear if mode == "fp32-mkl" else PackedLinear


@pytest.mark.parametrize("mode", ["fp32-mkl", "fp32-packed"])
@pytest.mark.parametrize("n_out,n_in", [(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 576)])
def test_a_rows_result_is_independent_of_the_rows_beside_it_by_construction(mode, n_out, n_in):
    # SmolLM2's projections (q/o, k/v, gate/up, down; a slice of the LM head): is every row of a call of 1 to 40
    # rows, at several offsets, bit for bit that row of one 64-row call? The kernels as they are: MKL's on the
    # AVX-512 Xeon yes, on the AVX2 AMD EPYC no (1-3, 5-7, 9-11 rows take other kernels); oneDNN's on the EPYC
    # yes, on the Xeon not for a lone row of the 1536-input projection; the probe (``row_invariant``, on its own
    # shapes) must say the same. The mode's module, padded as this machine's probe measured
    # (``machine_min_rows``): yes wherever a padding was found (every CPU measured so far)
    from aded_ray.verify.modes import measure_padding, row_invariant

    kind = _kind(mode)
    torch.manual_seed(n_out + n_in)
    lin = torch.nn.Linear(n_in, n_out, bias=False)
    bare, padded = kind(lin, min_rows=1), kind(lin)
    x = torch.randn(64, n_in)
    same = {"bare": True, "padded": True}
    with torch.no_grad():
        for name, packed in (("bare", bare), ("padded", padded)):
            full = packed(x)
            np.testing.assert_allclose(full.numpy(), lin(x).numpy(), atol=1e-4)
            for rows in list(range(1, 18)) + [31, 32, 33, 40]:
                for start in (0, 3, 64 - rows):
                    got = packed(x[start:start + rows].contiguous())
                    np.testing.assert_allclose(got.numpy(), full[start:start + rows].numpy(), atol=1e-4)
                    same[name] &= torch.equal(got, full[start:start + rows])
    # per shape: the kernel a call takes depends on its shape (on the AVX-512 AMD EPYC, oneDNN's lone rows of
    # the 1536-input projection only, as on the Xeon)
    assert same["bare"] == row_invariant(lambda lin: kind(lin, min_rows=1), shapes=[(n_out, n_in)])
    assert same["padded"] == (measure_padding(mode) is not None)
    assert measure_padding(mode) is not None, f"no padding makes {mode} row-invariant on this CPU: it is not exact"


@pytest.mark.parametrize("mode", ["fp32-mkl", "fp32-packed"])
def test_padding_is_the_fewest_rows_that_make_the_kernel_row_invariant_here(mode):
    from aded_ray.verify.modes import PAD_CANDIDATES, machine_min_rows, measure_padding, row_invariant

    kind = _kind(mode)
    pad = measure_padding(mode)
    assert pad in PAD_CANDIDATES and machine_min_rows(mode) == pad
    assert row_invariant(lambda lin: kind(lin, min_rows=pad))
    for fewer in (q for q in PAD_CANDIDATES if q < pad):        # none smaller would do
        assert not row_invariant(lambda lin: kind(lin, min_rows=fewer))


@pytest.mark.parametrize("mode", ["fp32-mkl", "fp32-packed"])
def test_a_padded_call_returns_only_its_own_rows_on_literal_values(mode):
    kind = _kind(mode)
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]))
        lin.bias.copy_(torch.tensor([0.25, -4.0]))
    packed = kind(lin, min_rows=12)
    x = torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, -1.0]])
    assert packed(x).tolist() == [[6.25, -4.5], [-0.75, -6.0]]                        # 2 rows, computed as 12
    assert packed(x[None, :1]).shape == (1, 1, 2) and packed(x[:1]).tolist() == [[6.25, -4.5]]
    assert packed(x.repeat(7, 1)).shape == (14, 2)                                     # more rows: no padding
    assert packed(x[None].repeat(3, 4, 1)).shape == (3, 8, 2)                         # [B, T, K]
    with pytest.raises(ValueError, match="min_rows must be at least 1, not 0"):
        kind(lin, min_rows=0)


class _RowByRow(torch.nn.Module):
    """A linear computed one row at a time: row-invariant by construction; ``skew`` makes odd-sized calls round
    differently, as a kernel chosen by the row count would."""

    def __init__(self, lin, skew=0.0):
        super().__init__()
        self.lin, self.skew = lin, skew

    def forward(self, x):
        y = torch.stack([self.lin(r[None])[0] for r in x])
        return y + self.skew * (x.shape[0] % 2)


def test_row_invariance_probe_on_kernels_that_are_and_are_not():
    from aded_ray.verify.modes import row_invariant

    assert row_invariant(_RowByRow, counts=(1, 2, 3, 8), full=16)
    assert not row_invariant(lambda lin: _RowByRow(lin, skew=1e-3), counts=(1, 2, 3, 8), full=16)
    assert row_invariant(lambda lin: _RowByRow(lin, skew=1e-3), counts=(2, 4, 8), full=16)   # even counts only


def test_the_service_chooses_a_row_invariant_mode_where_this_cpu_has_one(tmp_path, monkeypatch):
    import json

    from aded_ray.verify import modes

    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    inv = {"fp32-mkl": modes.row_invariant(modes.MklPackedLinear), "fp32-packed": modes.row_invariant(modes.PackedLinear)}
    assert modes.cpu_row_invariance() == inv
    choice = modes.preferred_cpu_mode()
    if any(inv.values()):
        assert inv[choice], (choice, inv)
    saved = json.loads(next((tmp_path / "modes").glob("cpu-linears-*.json")).read_text())
    assert saved["row_invariant"] == inv and saved["choice"] == choice
    assert saved["min_rows"] == {m: modes.measure_padding(m) for m in ("fp32-mkl", "fp32-packed")}
    # a file from before the invariance probe (timings only), or from before the paddings, is probed again
    cached = next((tmp_path / "modes").glob("*.json"))
    cached.write_text(json.dumps({"us": {"fp32-mkl": 1.0, "fp32-packed": 2.0}, "choice": "bogus"}))
    assert modes.preferred_cpu_mode() == choice
    cached.write_text(json.dumps({"us": {"fp32-mkl": 1.0, "fp32-packed": 2.0}, "choice": "fp32-mkl",
                                  "row_invariant": {"fp32-mkl": False, "fp32-packed": True}, "mkl_min_rows": 12}))
    assert modes.preferred_cpu_mode() == choice and modes.machine_min_rows("fp32-mkl") == saved["min_rows"]["fp32-mkl"]


@pytest.mark.parametrize("probe", ["fp32-mkl", "fp32-packed"])
def test_the_cpu_default_is_the_probes_choice_and_compile_auto_follows_it(probe, monkeypatch):
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.verify import modes

    monkeypatch.setattr(modes, "preferred_cpu_mode", lambda: probe)     # what this machine's probe chose
    mkl = probe == "fp32-mkl"
    assert VerifyConfig(device="cpu").resolved_mode() == probe
    # compiled graphs call fp32-mkl's packed weights; without them the compiler packs plain fp32 itself
    assert VerifyConfig(device="cpu", compile=True).resolved_mode() == ("fp32-mkl" if mkl else "fp32")
    assert VerifyConfig(device="cpu", tp_size=2).resolved_mode() == "fp32"        # AutoTP shards nn.Linear
    assert VerifyConfig(device="cuda").resolved_mode() == "fp32"
    # compile "auto": the batched pass compiled on CPUs in fp32-mkl only (never on CUDA, never for one request)
    auto = VerifyConfig(device="cpu", compile="auto")
    assert EngineConfig(verify=auto).compiled_batched == mkl
    assert not EngineConfig(verify=auto, max_batch=1).compiled_batched
    assert not EngineConfig(verify=auto, max_batch=1).compiled_static
    assert not EngineConfig(verify=VerifyConfig(device="cpu", compile="auto", mode="fp32")).compiled_batched
    assert not EngineConfig(verify=VerifyConfig(device="cpu", compile="auto", mode="fp32-packed")).compiled_batched
    assert not EngineConfig(verify=VerifyConfig(device="cuda", compile="auto")).compiled_batched
    assert not EngineConfig(verify=VerifyConfig(device="cpu", compile="auto", tp_size=2)).compiled_batched
    assert not EngineConfig(verify=VerifyConfig(device="cpu", compile="auto", widths=[8])).compiled_batched
    assert not EngineConfig(verify=VerifyConfig(device="cpu")).compiled_batched          # the library's default
    assert EngineConfig(verify=VerifyConfig(device="cpu", compile=True), max_batch=1).compiled_static


def test_the_probe_prefers_mkl_unless_onednn_is_clearly_faster_and_is_cached_per_machine(tmp_path, monkeypatch):
    from aded_ray.verify import modes

    assert modes.choose_cpu_mode({"fp32-mkl": 105.0, "fp32-packed": 100.0}) == "fp32-mkl"     # within 10%
    assert modes.choose_cpu_mode({"fp32-mkl": 111.0, "fp32-packed": 100.0}) == "fp32-packed"
    us = modes.probe_cpu_linears(reps=5)
    assert set(us) == {"fp32-mkl", "fp32-packed"} and all(v > 0 for v in us.values())
    monkeypatch.setenv("ADED_CACHE_DIR", str(tmp_path))
    invariance = []         # both modes row-invariant: the timings decide
    monkeypatch.setattr(modes, "measure_row_invariance", lambda: invariance.append(1) or {"fp32-mkl": True,
                                                                                         "fp32-packed": True})
    probes = []
    monkeypatch.setattr(modes, "probe_cpu_linears", lambda **kw: probes.append(1) or {"fp32-mkl": 300.0,
                                                                                      "fp32-packed": 200.0})
    assert modes.preferred_cpu_mode() == "fp32-packed" and modes.preferred_cpu_mode() == "fp32-packed"
    assert len(probes) == 1 and len(list((tmp_path / "modes").glob("cpu-linears-*.json"))) == 1   # measured once
    if modes._both_libraries():     # the engine's invariance check reads the same file: nothing measured again
        assert modes.cpu_row_invariance() == {"fp32-mkl": True, "fp32-packed": True}
        assert len(probes) == 1 and len(invariance) == 1


def test_an_engine_warns_only_for_a_packed_mode_that_is_not_row_invariant_here(monkeypatch):
    from aded_ray.verify import modes

    monkeypatch.setattr(modes, "cpu_row_invariance", lambda: {"fp32-mkl": False, "fp32-packed": True})
    warning = modes.row_invariance_warning("fp32-mkl")
    assert "fp32-mkl" in warning and "['fp32-packed']" in warning
    assert modes.row_invariance_warning("fp32-packed") is None
    assert modes.row_invariance_warning("fp32") is None and modes.row_invariance_warning("bf16-packed") is None
    monkeypatch.setattr(modes, "cpu_row_invariance", lambda: {"fp32-mkl": False, "fp32-packed": False})
    assert "none" in modes.row_invariance_warning("fp32-packed")


def test_fp32_mkl_refuses_what_it_cannot_run():
    from aded_ray.config import VerifyConfig
    from aded_ray.verify.modes import load_for_mode

    with pytest.raises(ValueError, match="'fp32-packed'"):
        VerifyConfig(mode="fp32-packed", compile=True)
    with pytest.raises(ValueError, match="'fp32-mkl' is CPU-only"):
        load_for_mode(None, "fp32-mkl", "cuda")
    with pytest.raises(ValueError, match="packs fp32 weights"):
        MklPackedLinear(torch.nn.Linear(4, 4).to(torch.bfloat16))


@pytest.fixture(scope="module")
def mkl_engine(corpus_matrix, tmp_path_factory):
    from aded_ray.config import EngineConfig, VerifyConfig
    from aded_ray.engine import Engine

    store = tmp_path_factory.mktemp("mkl") / "store.tri"
    corpus_matrix.save(store)
    e = Engine(EngineConfig(store=str(store), max_batch=8, verify=VerifyConfig(mode="fp32-mkl", budget=16)))
    yield e
    e.shutdown()


@pytest.mark.model
@pytest.mark.slow
def test_engine_in_fp32_mkl_is_lossless_under_load(mkl_engine, sibling):
    assert mkl_engine.mode == "fp32-mkl" and mkl_engine.exact and mkl_engine.speculate
    # every request under load = the same request alone (greedy, sampled, stop string, cancellation)
    sibling("test_batch")._lossless_under_load(mkl_engine)


@pytest.mark.model
@pytest.mark.slow
def test_engine_in_fp32_mkl_equals_generate(mkl_engine, greedy_references, sibling):
    sibling("test_static").concurrent_greedy_equals_generate(mkl_engine, greedy_references)


def test_the_padding_is_measured_per_thread_count(monkeypatch):
    # MKL's kernels differ by thread count (on the AMD EPYC: 12 rows with 2 threads, 4 with 1), as the probe's
    # cache file does (its key holds the count): a process's measurement is kept per count, never reused for another
    from aded_ray.verify import modes

    monkeypatch.setattr(modes, "_PADDING", {})
    threads, tried = [2], []
    monkeypatch.setattr(modes.torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(modes, "row_invariant", lambda kind: tried.append(threads[0]) or threads[0] == 2)
    assert modes.measure_padding("fp32-mkl") == 1 and modes.measure_padding("fp32-mkl") == 1 and tried == [2]
    threads[0] = 1
    assert modes.measure_padding("fp32-mkl") is None and len(tried) == 1 + len(modes.PAD_CANDIDATES)
    assert modes.measure_padding("fp32-mkl") is None and len(tried) == 1 + len(modes.PAD_CANDIDATES)  # kept
    threads[0] = 2
    assert modes.measure_padding("fp32-mkl") == 1 and len(tried) == 1 + len(modes.PAD_CANDIDATES)
    assert modes.measure_row_invariance()["fp32-mkl"] is True
    threads[0] = 1
    assert modes.measure_row_invariance()["fp32-mkl"] is False
