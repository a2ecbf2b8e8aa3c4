"""A verifier backed by ``tp_size`` Ray actors running DeepSpeed AutoTP (SPMD).

Each rank actor holds one shard of the model (``deepspeed.init_inference(tensor_parallel={"tp_size": N},
replace_with_kernel_inject=False)``) and its own :class:`TreeVerifier` (KV cache of its heads). Every call
(prefill, tree forward, commit) goes to all ranks at once with identical arguments; rank 0's logits are
returned. A call that does not complete within ``step_timeout_s`` (a dead or hung rank: the others wait
in a collective) marks the group broken: the request fails, ``healthy()`` turns false, the Serve replica
fails its health check and Serve replaces it with a fresh group.

On CPU the collectives use gloo (DeepSpeed's CPU accelerator, with its shared-memory all-reduce, which
needs ``LOCAL_SIZE``); on GPUs, NCCL. Selected by ``device``, never by editing code.
"""
from __future__ import annotations

import glob
import os

import numpy as np

from aded_ray.draft.tree import DraftTree


class RankWorker:
    """One tensor-parallel rank (instantiated as a Ray actor by :class:`TPGroup`)."""

    def __init__(self, rank: int, world: int, master_port: int, model: str | None, dtype: str, device: str,
                 threads: int, cache_dir: str | None):
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_SIZE=str(world),
                          LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master_port),
                          DS_ACCELERATOR="cpu" if device == "cpu" else "cuda", HF_HUB_OFFLINE="1")
        if cache_dir:
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache_dir, "torch_extensions"))
        import deepspeed
        import torch

        from aded_ray.verify.loading import load_model
        from aded_ray.verify.target import TreeVerifier

        torch.set_num_threads(threads)
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
        lm = load_model(model, dtype=dtype, device="cpu" if device == "cpu" else "cuda")
        engine = deepspeed.init_inference(lm, tensor_parallel={"tp_size": world}, dtype=getattr(torch, dtype),
                                          replace_with_kernel_inject=False)
        self.model = engine.module.eval()
        self.rank = rank
        self.verifier = TreeVerifier(self.model)

    def ready(self) -> int:
        return self.rank

    def prefill(self, ids):
        out = self.verifier.prefill(ids)
        return out.cpu().numpy() if self.rank == 0 else None

    def forward_tree(self, root: int, tokens, parents):
        out = self.verifier.forward_tree(root, DraftTree(tokens, parents))
        return out.cpu().numpy() if self.rank == 0 else None

    def commit(self, keep) -> int:
        self.verifier.commit(keep)
        return self.verifier.length


class GroupBroken(RuntimeError):
    pass


class TPGroup:
    """Starts the rank actors (in the caller's placement group when there is one, else in a new one)."""

    def __init__(self, *, tp_size: int, model: str | None = None, dtype: str = "float32", device: str = "cpu",
                 threads_per_rank: int = 1, cpus_per_rank: float = 0.5, step_timeout_s: float = 60.0,
                 start_timeout_s: float = 600.0, bundle_offset: int | None = None):
        import ray
        from ray.util.placement_group import get_current_placement_group, placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from aded_ray.paths import cache_dir

        if tp_size < 2:
            raise ValueError(f"tp_size {tp_size}: a tensor-parallel group needs at least 2 ranks")
        self.tp_size, self.step_timeout_s = tp_size, step_timeout_s
        from aded_ray.store.server import free_port

        self.port = free_port()
        self.broken: str | None = None
        pg = get_current_placement_group()
        self._own_pg = None
        if pg is None or bundle_offset is None:
            res = {"CPU": cpus_per_rank} if device == "cpu" else {"CPU": cpus_per_rank, "GPU": 1}
            pg = placement_group([res] * tp_size, strategy="PACK" if device == "cpu" else "STRICT_PACK")
            ray.get(pg.ready(), timeout=start_timeout_s)
            self._own_pg, bundle_offset = pg, 0
        actor = ray.remote(RankWorker)
        env = {k: v for k, v in os.environ.items() if k in ("ADED_CACHE_DIR", "TORCH_EXTENSIONS_DIR")}
        self.ranks = [
            actor.options(
                name=f"aded-tp-rank-{self.port}-{i}", namespace="aded", lifetime=None,
                num_cpus=cpus_per_rank, num_gpus=0 if device == "cpu" else 1,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg,
                                                                     placement_group_bundle_index=bundle_offset + i),
                runtime_env={"env_vars": env} if env else None,
            ).remote(i, tp_size, self.port, model, dtype, device, threads_per_rank, str(cache_dir()))
            for i in range(tp_size)
        ]
        ray.get([r.ready.remote() for r in self.ranks], timeout=start_timeout_s)

    def _all(self, method: str, *args):
        import ray

        if self.broken:
            raise GroupBroken(f"tensor-parallel group is broken ({self.broken}); the replica must be replaced")
        refs = [getattr(r, method).remote(*args) for r in self.ranks]
        try:
            return ray.get(refs, timeout=self.step_timeout_s)[0]
        except Exception as e:  # noqa: BLE001 - timeout, dead actor, rank error: the group is unusable
            self.broken = f"{type(e).__name__}: {e}"[:300]
            for ref in refs:
                try:
                    ray.cancel(ref)     # the surviving ranks may be stuck in a collective: best effort
                except Exception:  # noqa: BLE001
                    pass
            raise GroupBroken(f"tensor-parallel step failed: {self.broken}") from None

    def healthy(self) -> bool:
        if self.broken:
            return False
        import ray

        try:
            ray.get([r.ready.remote() for r in self.ranks], timeout=min(10.0, self.step_timeout_s))
            return True
        except Exception as e:  # noqa: BLE001
            self.broken = f"health check: {type(e).__name__}"
            return False

    def verifier(self) -> "TPVerifier":
        return TPVerifier(self)

    def shutdown(self) -> None:
        import ray

        for r in self.ranks:
            try:
                ray.kill(r)
            except Exception:  # noqa: BLE001
                pass
        if self._own_pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self._own_pg)
        # DeepSpeed's shared-memory all-reduce buffers outlive the ranks (66 MiB each, in RAM)
        for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{self.port}_*"):
            try:
                os.remove(f)
            except OSError:
                pass


class TPVerifier:
    """The :class:`TreeVerifier` interface over a :class:`TPGroup` (one request at a time)."""

    def __init__(self, group: TPGroup):
        self.group = group
        self.length = 0

    def prefill(self, ids):
        import torch

        out = torch.from_numpy(self.group._all("prefill", [int(t) for t in ids]))
        self.length = len(ids)
        return out

    def forward_tree(self, root: int, tree: DraftTree):
        import torch

        return torch.from_numpy(self.group._all("forward_tree", int(root), np.asarray(tree.tokens),
                                                np.asarray(tree.parents)))

    def commit(self, keep) -> None:
        self.length = self.group._all("commit", [int(k) for k in keep])


