"""A verifier backed by ``tp_size`` Ray actors running DeepSpeed AutoTP (SPMD).

Each rank actor holds one shard of the model (``deepspeed.init_inference(tensor_parallel={"tp_size": N},
replace_with_kernel_inject=False)``), its own :class:`TreeVerifier` (one request; the KV cache of its heads)
and the batched KV of its shard for continuous batching (:class:`TPBatchKV`). Every call (prefill, tree
forward, commit; a batched pass) goes to all ranks at once with identical arguments; rank 0's logits are
returned. A call that does not complete within ``step_timeout_s`` (a dead or hung rank: the others wait
in a collective) marks the group broken: the request fails, ``healthy()`` turns false, the Serve replica
fails its health check and Serve replaces it with a fresh group.

On CPU the collectives use gloo (DeepSpeed's CPU accelerator, with its shared-memory all-reduce, which
needs ``LOCAL_SIZE``); on GPUs, NCCL. Selected by ``device``, never by editing code.

Devices and loading (see :func:`rank_env`):

* GPU: Ray gives each rank actor one GPU and sets ``CUDA_VISIBLE_DEVICES`` to it, so inside the actor that
  GPU is device 0 whatever the rank. ``LOCAL_RANK`` is therefore ``0`` (DeepSpeed passes it to
  ``set_device`` and to ``init_process_group(device_id=...)``; ``LOCAL_RANK = rank`` would name a device
  the actor cannot see), and ``LOCAL_SIZE``/``LOCAL_WORLD_SIZE`` are ``1`` (one visible device).
* CPU: ``LOCAL_RANK = rank`` and ``LOCAL_SIZE = world``: all ranks share the host, and DeepSpeed's
  shared-memory all-reduce sizes its buffers from ``LOCAL_SIZE``.
* Every rank loads the model on the CPU and hands that module to ``deepspeed.init_inference``. In
  DeepSpeed 0.19.8 the AutoTP replacement runs before the engine moves the module to the accelerator:
  each replaced linear layer slices its weight and moves only its slice to
  ``get_accelerator().current_device_name()`` (``TensorParallel_Layer.move``, the default
  ``keep_module_on_host=False``); the engine then moves what is left (embeddings, norms: replicated) with
  ``module.to(device)``. So a GPU receives its shard plus the replicated layers, never the whole model.
  The host holds the full model per rank while it is sharded (freed slice by slice).
"""
from __future__ import annotations

import glob
import itertools
import os
import weakref

import numpy as np

from aded_ray.draft.tree import DraftTree


def rank_env(rank: int, world: int, master_port: int, device: str) -> dict[str, str]:
    """The environment one rank sets before DeepSpeed starts (torch.distributed ``env://`` variables).

    ``device`` ``"cpu"``: ``LOCAL_RANK = rank``, ``LOCAL_SIZE = LOCAL_WORLD_SIZE = world`` (the shared-memory
    all-reduce of DeepSpeed's CPU accelerator needs every local rank). Otherwise (CUDA): each rank's actor
    sees only the GPU Ray assigned to it, so ``LOCAL_RANK = 0`` and ``LOCAL_SIZE = LOCAL_WORLD_SIZE = 1``.
    """
    cpu = device == "cpu"
    local_rank, local_size = (rank, world) if cpu else (0, 1)
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
            "LOCAL_SIZE": str(local_size), "LOCAL_WORLD_SIZE": str(local_size), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(master_port), "DS_ACCELERATOR": "cpu" if cpu else "cuda", "HF_HUB_OFFLINE": "1"}


def _weights(module) -> list:
    """The distinct tensors of ``module``'s state dict (parameters and persistent buffers; a tied weight
    once). Non-persistent buffers (e.g. rotary ``inv_freq``) are derived values, not weights."""
    seen, out = set(), []
    for t in module.state_dict(keep_vars=True).values():
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def weight_count(module) -> int:
    """Number of weight elements ``module`` holds: a tied weight counts once (see :func:`_weights`)."""
    return sum(t.numel() for t in _weights(module))


class RankWorker:
    """One tensor-parallel rank (instantiated as a Ray actor by :class:`TPGroup`)."""

    def __init__(self, rank: int, world: int, master_port: int, model: str | None, dtype: str, device: str,
                 threads: int, cache_dir: str | None):
        os.environ.update(rank_env(rank, world, master_port, device))
        if cache_dir:
            os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(cache_dir, "torch_extensions"))
        import deepspeed
        import torch

        from aded_ray.verify.loading import load_model
        from aded_ray.verify.target import TreeVerifier

        torch.set_num_threads(threads)
        if device != "cpu":
            if torch.cuda.device_count() < 1:
                raise RuntimeError(f"rank {rank}: no visible GPU (CUDA_VISIBLE_DEVICES="
                                   f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}); the actor needs num_gpus=1")
            torch.cuda.set_device(0)         # the one GPU Ray gave this actor
        deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
        lm = load_model(model, dtype=dtype, device="cpu")      # full model on the host only; see module doc
        engine = deepspeed.init_inference(lm, tensor_parallel={"tp_size": world}, dtype=getattr(torch, dtype),
                                          replace_with_kernel_inject=False)
        self.model = engine.module.eval()
        self.rank = rank
        self.verifier = TreeVerifier(self.model)
        self.kvs: dict[int, object] = {}       # TPBatchKV id -> this rank's BatchKV of its shard
        self.saved: dict[int, list] = {}        # save_prefix handle -> this rank's copy (the latest two)

    def ready(self) -> int:
        return self.rank

    def param_count(self) -> int:
        """Number of weight elements this rank holds (see :func:`weight_count`)."""
        return weight_count(self.model)

    def weight_devices(self) -> list[str]:
        """The distinct devices of this rank's weights (e.g. ``['cuda:0']``)."""
        return sorted({str(t.device) for t in _weights(self.model)})

    def prefill(self, ids):
        out = self.verifier.prefill(ids)
        return out.cpu().numpy() if self.rank == 0 else None

    def forward_tree(self, root: int, tokens, parents):
        out = self.verifier.forward_tree(root, DraftTree(tokens, parents))
        return out.cpu().numpy() if self.rank == 0 else None

    def commit(self, keep) -> int:
        self.verifier.commit(keep)
        return self.verifier.length

    # ---- batched passes (TPBatchKV): every rank runs the same call on its own BatchKV ----------------
    def kv_new(self, kid: int, prefill_chunk: int) -> None:
        from aded_ray.verify.batch import BatchKV

        self.kvs[kid] = BatchKV(self.model, prefill_chunk=prefill_chunk)

    def kv_drop(self, kid: int) -> None:
        self.kvs.pop(kid, None)

    def kv_call(self, kid: int, method: str, args: tuple, commit: list | None = None):
        """``BatchKV.method(*args)`` on this rank, after ``BatchKV.commit(commit)`` when one is given (the last
        step's, sent with the next call: one round trip per step); returns (rank 0's result, the slots'
        lengths). Logits come back as float32 arrays; a prompt chunk riding in a pass as ``(ids, start,
        max_tokens)``, and its outcome as ``(logits, ran, chunk logits)``."""
        import torch

        from aded_ray.verify.batch import PrefillChunk

        kv = self.kvs[kid]
        if commit is not None:
            kv.commit(commit)
        chunk = None
        if method == "save_prefix":
            slot, n, handle = args
            self.saved[handle] = kv.save_prefix(slot, n)
            for old in sorted(self.saved)[:-2]:
                del self.saved[old]
            out = None
        elif method == "load_prefix":
            slot, handle = args
            out = kv.load_prefix(slot, self.saved[handle])
        elif method == "sync":
            out = None
        elif method == "forward_trees":
            roots, trees, chunk_args = args
            chunk = PrefillChunk(*chunk_args) if chunk_args is not None else None
            out = kv.forward_trees(roots, trees, prefill=chunk) if chunk is not None else kv.forward_trees(roots, trees)
        else:
            out = getattr(kv, method)(*args)
        if self.rank != 0:
            return None, None
        if isinstance(out, torch.Tensor):
            out = out.float().cpu().numpy()
        if chunk is not None:
            out = (out, chunk.ran, None if chunk.logits is None else chunk.logits.float().cpu().numpy())
        return out, kv.lens.copy()


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

    def param_counts(self) -> list[int]:
        """Weight elements held by each rank, in rank order (:meth:`RankWorker.param_count`)."""
        import ray

        return ray.get([r.param_count.remote() for r in self.ranks], timeout=self.step_timeout_s)

    def verifier(self) -> "TPVerifier":
        return TPVerifier(self)

    def batch_kv(self, prefill_chunk: int = 512) -> "TPBatchKV":
        return TPBatchKV(self, prefill_chunk)

    def drop_kv(self, kid: int) -> None:
        """Free a :class:`TPBatchKV`'s caches on the ranks (best effort: a broken group holds nothing)."""
        if not self.broken:
            for r in self.ranks:
                try:
                    r.kv_drop.remote(kid)
                except Exception:  # noqa: BLE001
                    pass

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


def _tensor(a: np.ndarray):
    """A tensor of an array Ray returned (from its object store: read-only, so copied)."""
    import torch

    return torch.from_numpy(a if a.flags.writeable else a.copy())


class TPVerifier:
    """The :class:`TreeVerifier` interface over a :class:`TPGroup`, one request at a time (the exactness check's
    and ``max_batch`` 1's; batched engines use :class:`TPBatchKV`)."""

    def __init__(self, group: TPGroup):
        self.group = group
        self.length = 0

    def prefill(self, ids):
        out = _tensor(self.group._all("prefill", [int(t) for t in ids]))
        self.length = len(ids)
        return out

    def forward_tree(self, root: int, tree: DraftTree):
        return _tensor(self.group._all("forward_tree", int(root), np.asarray(tree.tokens), np.asarray(tree.parents)))

    def commit(self, keep) -> None:
        self.length = self.group._all("commit", [int(k) for k in keep])


_kv_ids = itertools.count(1)          # TPBatchKV ids and saved-prefix handles: unique in the process
_handles = itertools.count(1)


class TPBatchKV:
    """The :class:`aded_ray.verify.batch.BatchKV` interface over a :class:`TPGroup`: continuous batching in a
    tensor-parallel replica. Every rank holds a ``BatchKV`` of its own shard (the KV of its heads) and runs
    each call with identical arguments, so the ranks' collectives match; rank 0's results come back (logits
    as float32 on the host, where the decode loop reduces them) with the slots' lengths. Ragged layout with
    SDPA attention; a newcomer's prompt chunk rides in the decoding pass as in one process; the chat
    preamble's KV is kept on the ranks (the latest two) and copied into a slot by handle."""

    layout = "ragged"
    fuses_prefill = True

    def __init__(self, group: TPGroup, prefill_chunk: int = 512):
        import torch

        self.group, self.prefill_chunk = group, int(prefill_chunk)
        self.kid = next(_kv_ids)
        self.lens = np.zeros(0, np.int64)
        self.device = torch.device("cpu")      # where the logits arrive
        self._commit: list | None = None        # the last step's compaction, sent with the next call
        group._all("kv_new", self.kid, self.prefill_chunk)
        weakref.finalize(self, group.drop_kv, self.kid)

    def _call(self, method: str, *args):
        commit, self._commit = self._commit, None
        out, lens = self.group._all("kv_call", self.kid, method, args, commit)
        self.lens = np.array(lens)            # (arrays from Ray's object store are read-only)
        return out


    @property
    def used(self) -> int:
        return len(self.lens)

    def add_slot(self) -> int:
        return self._call("add_slot")

    def move_slot(self, src: int, dst: int) -> None:
        self._call("move_slot", int(src), int(dst))

    def drop_last(self) -> None:
        if self.group.broken:                  # freeing slots after a failed step: nothing left to free there
            self.lens = self.lens[:-1]
            return
        self._call("drop_last")

    def save_prefix(self, slot: int, n: int) -> int:
        handle = next(_handles)
        self._call("save_prefix", int(slot), int(n), handle)
        return handle

    def load_prefix(self, slot: int, handle: int) -> None:
        self._call("load_prefix", int(slot), handle)

    def prefill(self, slot: int, ids, start: int = 0, max_tokens: int | None = None):
        out = self._call("prefill", int(slot), [int(t) for t in ids], int(start), max_tokens)
        return None if out is None else _tensor(out)

    def forward_trees(self, roots, trees: list[DraftTree], width: int | None = None, prefill=None):
        if width is not None:
            raise ValueError(f"a tensor-parallel batch is ragged: no fixed width ({width})")
        chunk = None if prefill is None else ([int(t) for t in prefill.ids], int(prefill.start),
                                              int(prefill.max_tokens))
        out = self._call("forward_trees", [int(r) for r in roots], trees, chunk)
        if prefill is None:
            return _tensor(out)
        out, prefill.ran, logits = out
        prefill.logits = None if logits is None else _tensor(logits)
        return _tensor(out)

    def commit(self, keeps: list[list[int]]) -> None:
        """Compaction goes to the ranks with the next call (the next pass, or freeing a finished request's
        slot), saving a round trip per step; the lengths here count it at once."""
        if self._commit is not None:
            self._call("sync")                 # (two compactions without a call between: send the first)
        self._commit = [[int(i) for i in k] for k in keeps]
        lens = self.lens.copy()
        lens[: len(keeps)] += np.array([len(k) for k in self._commit], np.int64)
        self.lens = lens
