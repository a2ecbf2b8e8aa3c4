"""Lossless verification with the real SmolLM2 model in fp32: speculation only changes speed."""
import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from aded_ray.bench.traces import chat_ids
from aded_ray.decode import GenerationStats, generate_ids
from aded_ray.draft.build import matrix_from_token_docs
from aded_ray.draft.matrix import TrigramMatrix
from aded_ray.draft.mcts import MCTSDrafter
from aded_ray.draft.tree import DraftTree
from aded_ray.verify.accept import SamplingParams, accept, target_probs
from aded_ray.verify.target import TreeVerifier

pytestmark = pytest.mark.model

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "What is the capital of France? Answer in one sentence.",
    "List three fruits.",
    "Explain recursion to a child.",
    "def fibonacci(n):",
]
NEW = 40


class CheckedVerifier(TreeVerifier):
    """Asserts that the KV cache holds exactly the committed tokens after every step."""

    def __init__(self, model):
        super().__init__(model)
        self.lengths = []

    def commit(self, keep):
        super().commit(keep)
        assert self.cache.get_seq_length() == self.length
        self.lengths.append(self.length)


@pytest.fixture(scope="module")
def references(greedy_references):
    return greedy_references(PROMPTS, NEW)


def stores(tokenizer, corpus_matrix, references):
    V = len(tokenizer)
    rng = np.random.default_rng(0)
    adversarial = matrix_from_token_docs([rng.integers(0, V, 400_000).tolist()], V)   # random, confident drafts
    perfect = matrix_from_token_docs([ids + out for ids, out in references], V)       # drafts the answers
    return {"empty": TrigramMatrix.empty(V), "corpus": corpus_matrix, "adversarial": adversarial,
            "perfect": perfect}


def test_greedy_is_token_identical_to_generate(model, tokenizer, corpus_matrix, references):
    eos = [tokenizer.eos_token_id]
    for name, matrix in stores(tokenizer, corpus_matrix, references).items():
        accepted = 0
        for ids, ref in references:
            matrix.reset_deltas()
            v, st = CheckedVerifier(model), GenerationStats()
            out = [t for c in generate_ids(v, MCTSDrafter(matrix), ids, max_new_tokens=NEW, eos_ids=eos,
                                           stats=st) for t in c]
            assert out == ref, f"store {name}: speculative output differs from model.generate"
            assert v.lengths == sorted(v.lengths)  # each step commits root + accepted, never shrinks
            accepted += st.accepted_tokens
        if name == "perfect":
            assert accepted > 2 * len(references) * 10   # long accepted paths were exercised


def test_best_drafter_is_lossless_too(model, tokenizer, corpus_matrix, references):
    from aded_ray.draft.best import BestDrafter

    eos = [tokenizer.eos_token_id]
    for name, matrix in stores(tokenizer, corpus_matrix, references).items():
        if name == "empty":
            continue
        matrix.reset_deltas()
        drafter = BestDrafter(matrix)                    # its history carries over between the prompts
        for ids, ref in references:
            out = [t for c in generate_ids(CheckedVerifier(model), drafter, ids, max_new_tokens=NEW, eos_ids=eos)
                   for t in c]
            assert out == ref, f"store {name}: best-first drafts changed the output"
        # the loop fed the model's predictions back (recycle source) and the combiner learned from verdicts
        assert drafter.recycle.filled() > len(references) * NEW
        assert drafter.combiner.seen > 0


@torch.inference_mode()
def test_tree_logits_equal_path_logits(model, tokenizer):
    ids = chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[0]}])
    rng = np.random.default_rng(1)
    tokens = rng.integers(100, 40000, 12)
    tree = DraftTree(tokens, [-1, -1, 0, 0, 1, 2, 2, 3, 4, 5, 6, 9])    # branches down to depth 5
    v = TreeVerifier(model)
    v.prefill(ids)
    logits = v.forward_tree(7, tree)
    for node, path in enumerate([[i] for i in range(len(tree))]):
        chain, q = [], node
        while q >= 0:
            chain.append(int(tree.tokens[q]))
            q = int(tree.parents[q])
        full = torch.tensor([ids + [7] + chain[::-1]])
        ref = model(input_ids=full).logits[0, -1]
        assert (logits[node + 1] - ref).abs().max().item() < 1e-4
    root_ref = model(input_ids=torch.tensor([ids + [7]])).logits[0, -1]
    assert (logits[0] - root_ref).abs().max().item() < 1e-4


@torch.inference_mode()
def test_kv_compaction_then_decode_matches_recompute(model, tokenizer):
    ids = chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[1]}])
    v = TreeVerifier(model)
    v.prefill(ids)
    tree = DraftTree([11, 12, 13, 14], [-1, -1, 1, 2])
    v.forward_tree(7, tree)
    v.commit([0, 2, 3])                       # root, node 1 (12), node 2 (13): skips node 0
    assert v.length == len(ids) + 3 == v.cache.get_seq_length()
    nxt = v.forward_tree(99, DraftTree())[0]
    ref = model(input_ids=torch.tensor([ids + [7, 12, 13, 99]])).logits[0, -1]
    assert (nxt - ref).abs().max().item() < 1e-4


@torch.inference_mode()
def test_sampling_follows_target_at_root_and_drafted_position(model, tokenizer):
    ids = chat_ids(tokenizer, [{"role": "user", "content": PROMPTS[2]}])
    p = SamplingParams(temperature=1.0, top_k=8, seed=0)
    plain = model(input_ids=torch.tensor([ids])).logits[0, -1]
    root = int(plain.argmax())
    after_root = model(input_ids=torch.tensor([ids + [root]])).logits[0, -1]
    probs_root = target_probs(after_root, p)
    child = int(probs_root.argmax())
    after_child = model(input_ids=torch.tensor([ids + [root, child]])).logits[0, -1]
    v = TreeVerifier(model)
    v.prefill(ids)
    tree = DraftTree([child, int(torch.topk(probs_root, 2).indices[1])], [-1, -1])
    logits = v.forward_tree(root, tree)
    n = 6000
    first, second = {}, {}
    for seed in range(n):
        path, bonus = accept(tree, logits, SamplingParams(temperature=1.0, top_k=8, seed=seed))
        emitted = [int(tree.tokens[i]) for i in path] + [bonus]
        first[emitted[0]] = first.get(emitted[0], 0) + 1
        if emitted[0] == child:
            second[emitted[1]] = second.get(emitted[1], 0) + 1
    for counts, target in ((first, target_probs(after_root, p)), (second, target_probs(after_child, p))):
        support = torch.nonzero(target).flatten().tolist()
        assert set(counts) <= set(support)
        obs = np.array([counts.get(t, 0) for t in support], float)
        exp = target[support].numpy() * obs.sum()
        assert chisquare(obs, exp).pvalue > 1e-3


def test_model_in_the_loop_replay_matches_trace_replay(model, tokenizer, corpus_matrix, references):
    """The model-in-the-loop replay decodes the traces exactly and, for a drafter that ignores logits,
    counts the same steps as plain trace replay (the oracle): only the recycle source can differ."""
    from aded_ray.bench.model_replay import model_replay
    from aded_ray.bench.replay import replay

    traces = [{"prompt_ids": ids, "output_ids": ref} for ids, ref in references]
    corpus_matrix.reset_deltas()
    looped, same = model_replay(traces, MCTSDrafter(corpus_matrix), model, 64, eos_ids=[tokenizer.eos_token_id])
    corpus_matrix.reset_deltas()
    replayed = replay(traces, MCTSDrafter(corpus_matrix))
    assert same == len(traces)
    assert (looped.steps, looped.emitted) == (replayed.steps, replayed.emitted)
    # replay also drafts below a request's final root, which the decode loop never verifies
    assert 0 < looped.nodes <= replayed.nodes


def test_seeded_sampling_is_identical_with_and_without_speculation(model, tokenizer, corpus_matrix, references):
    """Sampling draws the token at output position j with u(seed, j): the trees change nothing but speed."""
    from aded_ray.decode import FixedBudget, NoDraft

    p = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    for ids, _ in references[:3]:
        corpus_matrix.reset_deltas()
        runs = []
        for drafter, budget in ((NoDraft(), FixedBudget(0)), (MCTSDrafter(corpus_matrix), FixedBudget(32))):
            stats = GenerationStats()
            runs.append([t for new in generate_ids(TreeVerifier(model), drafter, ids, max_new_tokens=NEW,
                                                   sampling=p, eos_ids=[tokenizer.eos_token_id], budget=budget,
                                                   stats=stats) for t in new])
        assert runs[0] == runs[1]
        assert stats.draft_tokens > 0
