"""A compiled static verifier's passes are compiled once per shape for the model, not once per verifier: a
second verifier (the engine builds one for its start-up exactness check inside inference mode and one for
its cost curve outside it) reuses the graphs. A tiny random Llama stands in for SmolLM2 (seconds, not
minutes); the SmolLM2 engine's start-up compile is covered by ``test_static.py``."""
import torch


def test_a_second_compiled_verifier_built_outside_inference_mode_does_not_recompile():
    import torch._dynamo.utils as dynamo_utils
    from transformers import LlamaConfig, LlamaForCausalLM

    from aded_ray.verify.static import StaticTreeVerifier

    torch._dynamo.reset()       # independent of what other tests compiled in this process (same code objects)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=256)).eval()
    graphs = lambda: dynamo_utils.counters["stats"]["unique_graphs"]  # noqa: E731
    before = graphs()
    with torch.inference_mode():
        first = StaticTreeVerifier(model, widths=(1,), max_len=64, compile=True, dynamic=None)
    logits = first.prefill([1, 2, 3])
    compiled = graphs()
    assert compiled > before                       # the first verifier compiled its width
    second = StaticTreeVerifier(model, widths=(1,), max_len=64, compile=True, dynamic=None)
    second.reset()                                 # outside inference mode: the buffers are inference tensors
    assert torch.equal(second.prefill([1, 2, 3]), logits)
    assert graphs() == compiled                    # ... and the second verifier's passes reuse the graph
