"""Fast checks (no Ray, no DeepSpeed run) of how a tensor-parallel rank sets itself up: its environment on
CPU and on GPUs, where it loads the model, and how its weights are counted. The real sharding is checked
with the model in ``tests/test_tp.py::test_each_rank_holds_its_shard``."""
import os
import sys
import types

import pytest
import torch

from aded_ray.tp.group import RankWorker, rank_env, weight_count


def test_rank_env_on_cpu_names_every_local_rank():
    env = rank_env(1, 2, 29500, "cpu")
    assert env["RANK"] == "1" and env["WORLD_SIZE"] == "2"
    assert env["LOCAL_RANK"] == "1"                       # ranks share the host
    assert env["LOCAL_SIZE"] == env["LOCAL_WORLD_SIZE"] == "2"   # the shm all-reduce needs all of them
    assert env["DS_ACCELERATOR"] == "cpu"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"] == "29500"


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_rank_env_on_cuda_uses_the_one_visible_gpu(rank):
    env = rank_env(rank, 4, 29500, "cuda")
    assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "4"
    assert env["LOCAL_RANK"] == "0"                       # Ray shows each actor only its own GPU
    assert env["LOCAL_SIZE"] == env["LOCAL_WORLD_SIZE"] == "1"
    assert env["DS_ACCELERATOR"] == "cuda"


def test_weight_count_counts_a_tied_weight_once_and_skips_derived_buffers():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.head = torch.nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight                          # tied: 40 elements, once
            self.norm = torch.nn.LayerNorm(4)                           # 4 + 4
            self.register_buffer("scale", torch.ones(3))                # a persistent buffer is a weight
            self.register_buffer("inv_freq", torch.ones(5), persistent=False)   # derived: not counted

    assert weight_count(Tiny()) == 40 + 8 + 3


def _start_rank(monkeypatch, rank: int, device: str) -> dict:
    """Run ``RankWorker.__init__`` with DeepSpeed, CUDA and the model loader replaced by recorders."""
    calls: dict = {"order": []}
    for key in rank_env(rank, 2, 29500, device):            # restored when the test ends
        monkeypatch.setenv(key, os.environ.get(key, ""))
    fake_ds = types.SimpleNamespace(
        init_distributed=lambda dist_backend: (calls["order"].append("init_distributed"),
                                               calls.update(backend=dist_backend, env=dict(os.environ))),
        init_inference=lambda module, **kw: (calls.update(inference=kw), types.SimpleNamespace(module=module))[1],
    )
    monkeypatch.setitem(sys.modules, "deepspeed", fake_ds)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: (calls["order"].append("set_device"),
                                                             calls.update(set_device=i)))

    def fake_load(model, *, dtype, device):
        calls["load_device"] = device
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr("aded_ray.verify.loading.load_model", fake_load)
    monkeypatch.setattr("aded_ray.verify.target.TreeVerifier", lambda model: None)
    RankWorker(rank, 2, 29500, None, "float32", device, torch.get_num_threads(), None)
    return calls


def test_a_gpu_rank_binds_device_0_and_loads_on_the_host(monkeypatch):
    calls = _start_rank(monkeypatch, 1, "cuda")
    assert calls["set_device"] == 0 and calls["order"][:2] == ["set_device", "init_distributed"]
    assert calls["backend"] == "nccl" and calls["env"]["LOCAL_RANK"] == "0"
    assert calls["load_device"] == "cpu"                   # DeepSpeed moves only the shard to the GPU
    assert calls["inference"]["tensor_parallel"] == {"tp_size": 2}
    assert calls["inference"]["replace_with_kernel_inject"] is False


def test_a_cpu_rank_keeps_its_local_rank_and_gloo(monkeypatch):
    calls = _start_rank(monkeypatch, 1, "cpu")
    assert "set_device" not in calls
    assert calls["backend"] == "gloo"
    assert calls["env"]["LOCAL_RANK"] == "1" and calls["env"]["LOCAL_SIZE"] == "2"
    assert calls["load_device"] == "cpu"
