"""The row-invariant attention: a query row's bits depend on its own keys alone, so tree passes (any tree, any
batch) give plain decoding's logits bit for bit with the real SmolLM2 in the packed fp32 modes."""
import copy

import numpy as np
import pytest
import torch

from aded_ray.draft.tree import DraftTree
from aded_ray.verify import invariant_attention as ia
from aded_ray.verify.invariant_attention import Rows, attention

H, HKV, D = 6, 2, 16


def _sdpa(q, K, V, allow, scale):
    """Reference: each row alone, float64, over its visible keys."""
    out = torch.empty_like(q)
    for t in range(q.shape[0]):
        keys = np.flatnonzero(allow[t])
        for h in range(q.shape[1]):
            g = h // (q.shape[1] // K.shape[1])
            s = (K[0, g, keys].double() @ q[t, h].double()) * scale
            out[t, h] = (torch.softmax(s, 0) @ V[0, g, keys].double()).float()
    return out


def test_a_row_is_the_same_bits_whatever_else_is_in_the_pass():
    g = torch.Generator().manual_seed(0)
    L = 45                                    # committed prefix
    K = torch.randn(1, HKV, 128, D, generator=g)
    V = torch.randn(1, HKV, 128, D, generator=g)
    q = torch.randn(1, H, D, generator=g)
    # plain decoding at position L + 2: keys 0 .. L + 2 in a pass of one row
    plain_K, plain_V = K.clone(), V.clone()
    plain = attention(q, plain_K, plain_V, Rows.padded(np.ones((1, 1, L + 3), bool)), 0.25)
    # the same query as node 4 of a tree (root, a, b, c, d with d under b, b under root): its ancestors sit at
    # columns L, L + 2, L + 4 with siblings between them, its keys copied there; other rows around it
    tree_K, tree_V = K.clone(), V.clone()
    for col, src in ((L, L), (L + 2, L + 1), (L + 4, L + 2)):
        tree_K[0, :, col], tree_V[0, :, col] = K[0, :, src], V[0, :, src]
    parents = [-1, 0, 0, 1, 2]                # root, then a, b (children of the root), c under a, d under b
    allow = np.zeros((1, 5, L + 5), bool)
    allow[0, :, :L] = True
    for i, p in enumerate(parents):
        allow[0, i, L + i] = True
        while p >= 0:
            allow[0, i, L + p] = True
            p = parents[p]
    qs = torch.randn(5, H, D, generator=g)
    qs[4] = q[0]
    tree = attention(qs, tree_K, tree_V, Rows.padded(allow), 0.25)
    assert torch.equal(tree[4], plain[0])
    # ... and in a batch of two requests, the other one with a longer prefix, keys padded further
    KK, VV = torch.randn(2, HKV, 128, D, generator=g), torch.randn(2, HKV, 128, D, generator=g)
    KK[1], VV[1] = tree_K[0], tree_V[0]
    allow2 = np.zeros((2, 5, L + 60), bool)
    allow2[0, :3, :L + 57] = np.tril(np.ones((3, L + 57), bool), L + 54)
    allow2[1, :, :L + 5] = allow[0]
    batch = attention(torch.cat([qs[:3], qs]), KK, VV, Rows.packed(allow2, [3, 5]), 0.25)
    assert torch.equal(batch[3 + 4], plain[0])
    # the one-thread kernel computes the same bits (a replica given one thread runs it)
    rows = Rows.packed(allow2, [3, 5])
    out = torch.empty_like(batch)
    ia.attend_rows_serial(torch.cat([qs[:3], qs]).numpy(), KK.numpy(), VV.numpy(), 0, rows.allow, rows.row_r,
                          rows.row_i, rows.row_hi, rows.req_hi, 0.25, out.numpy())
    assert torch.equal(out, batch)
    # it is attention: every row agrees with a float64 softmax over its visible keys
    rows = Rows.packed(allow2, [3, 5])
    vis = allow2[rows.row_r, rows.row_i]
    for r, idx in ((0, slice(0, 3)), (1, slice(3, 8))):
        ref = _sdpa(torch.cat([qs[:3], qs])[idx], KK[r:r + 1], VV[r:r + 1], vis[idx], 0.25)
        assert (batch[idx] - ref).abs().max().item() < 1e-5


def test_the_exponential_is_accurate_and_the_same_in_every_lane():
    rng = np.random.default_rng(1)
    x = np.r_[0.0, -1e-8, -0.5, -np.log(2), -10.0, -87.0, -86.9, rng.uniform(-60, 0, 61)].astype(np.float32)
    s = x.copy()
    ia._exp_rows(s, len(s), np.float32(0.0), np.empty(len(s), np.int32))
    ref = np.exp(x.astype(np.float64))
    assert np.all(np.abs(s / ref - 1) < 4e-7)
    for i in range(len(x)):                       # alone (the scalar remainder) = inside a vector body
        one = x[i:i + 1].copy()
        ia._exp_rows(one, 1, np.float32(0.0), np.empty(1, np.int32))
        assert one[0] == s[i], i
    assert ia._sum8(np.arange(1, 20, dtype=np.float32), 19) == 190.0


def test_bad_input_is_refused():
    q = torch.zeros(2, H, D)
    K = torch.zeros(1, HKV, 8, D)
    with pytest.raises(ValueError, match="at least one key"):
        Rows.padded(np.zeros((1, 2, 4), bool))
    with pytest.raises(ValueError, match="float32"):
        attention(q.double(), K, K, Rows.padded(np.ones((1, 2, 4), bool)), 1.0)
    with pytest.raises(ValueError, match="strided"):
        attention(q, K[:, :, :4], K[:, :, :4], Rows.padded(np.ones((1, 2, 4), bool)), 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        attention(q, K, K, Rows.padded(np.ones((1, 2, 9), bool)), 1.0)


@pytest.fixture(scope="module")
def packed(model):
    from aded_ray.verify.modes import PackedLinear, pack_linears

    return pack_linears(copy.deepcopy(model), PackedLinear)


def _plain_rows(verifier, prompt, path):
    """Logits plain decoding computes for each token of ``path`` after ``prompt`` (one pass per token)."""
    verifier.prefill(prompt)
    rows = []
    for tok in path:
        rows.append(verifier.forward_tree(tok, DraftTree())[0])
        verifier.commit([0])
    return rows


@pytest.mark.model
def test_tree_and_batched_passes_equal_plain_decoding_bit_for_bit(packed):
    from aded_ray.verify.batch import BatchKV, PrefillChunk
    from aded_ray.verify.exactness import check_exactness
    from aded_ray.verify.target import TreeVerifier

    prompt = list(range(2000, 2090))
    # a branched tree: the accepted path root -> 1 -> 4 -> 6 has siblings between its ancestors' columns
    tree = DraftTree([5, 611, 6, 7, 612, 8, 613], [-1, -1, 1, 1, 1, 4, 4])
    path_rows, path_tokens = [0, 2, 5, 7], [610, 611, 612, 613]
    plain = _plain_rows(TreeVerifier(packed, attention="invariant"), prompt, path_tokens)
    v = TreeVerifier(packed, attention="invariant")
    v.prefill(prompt)
    out = v.forward_tree(610, tree)
    for r, ref in zip(path_rows, plain):
        assert torch.equal(out[r], ref)
    # the batched pass: this request beside another one and a prompt chunk riding in the same pass
    kv = BatchKV(packed, prefill_chunk=64, attention="invariant")
    for p in (prompt, list(range(3000, 3150))):
        s = kv.add_slot()
        while kv.prefill(s, p, int(kv.lens[s])) is None:
            pass
    kv.add_slot()
    chunk = PrefillChunk(list(range(4000, 4040)), 0, 40)
    rows = kv.forward_trees([610, 9], [tree, DraftTree([11, 12], [-1, 0])], prefill=chunk)
    for r, ref in zip(path_rows, plain):
        assert torch.equal(rows[r], ref)
    # the padded layout (fixed widths): the same rows
    padded = BatchKV(packed, widths=(16,), attention="invariant")
    s = padded.add_slot()
    padded.prefill(s, prompt)
    rows = padded.forward_trees([610], [tree])
    for r, ref in zip(path_rows, plain):
        assert torch.equal(rows[r], ref)
    # the start-up check sees it too: bit for bit with the invariant kernel
    rep = check_exactness(lambda: TreeVerifier(packed, attention="invariant"), "fp32-packed", [(16, 37), (32, 133)])
    assert rep.exact and rep.bitwise, rep.summary()
