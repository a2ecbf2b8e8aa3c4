"""The engine: tokenizer + target model + drafter + budget, one request at a time. No Ray in here.

``Engine.generate(prompt, ...)`` yields :class:`Chunk` objects with new text as tokens are committed and
ends with one whose ``finish_reason`` is set ("stop" for EOS or a stop string, "length" for the limit).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from aded_ray.config import EngineConfig
from aded_ray.decode import FixedBudget, GenerationStats, NoDraft
from aded_ray.errors import InvalidParameter
from aded_ray.verify.accept import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = field(default=None, repr=False)


class Engine:
    """Built on its scheduler's thread, which then runs every pass: all of the engine's tensor work happens on
    one thread. On CPUs this is a matter of speed, not style: each thread that runs a parallel torch op gets
    its own OpenMP worker pool, and once the pools' workers outnumber the cores, libgomp stops spinning
    between parallel regions (its "throttled" wait) and every op of a pass pays a futex wake-up: measured
    here, a 113-token prefill took ~140 ms on the scheduler's thread of an engine built on another thread
    against ~100 ms with one thread doing both (2 cores, fp32-packed). Keep tensor work off other threads."""

    def __init__(self, config: EngineConfig | None = None, *, speculate: bool = True,
                 tp_bundle_offset: int | None = None):
        self.config = config or EngineConfig()
        built = threading.Event()
        failed: list[BaseException] = []

        def compute_thread() -> None:
            try:
                self._build(speculate, tp_bundle_offset)
            except BaseException as e:  # noqa: BLE001 - raised again on the constructing thread
                failed.append(e)
                return
            finally:
                built.set()
            self.scheduler.run()            # from here on this thread is the scheduler's

        threading.Thread(target=compute_thread, name="aded-scheduler", daemon=True).start()
        built.wait()
        if failed:
            raise failed[0]

    def _build(self, speculate: bool, tp_bundle_offset: int | None) -> None:
        from aded_ray.draft.matrix import TrigramMatrix
        from aded_ray.paths import cache_dir
        from aded_ray.verify.loading import load_tokenizer, resolve_model
        from aded_ray.verify.exactness import check_exactness, check_shapes
        from aded_ray.verify.modes import load_for_mode

        cfg = self.config
        v = cfg.verify
        self.compute_thread = threading.current_thread()     # builds the model and runs every pass
        self._preamble: list[int] | None = None
        if v.threads:
            torch.set_num_threads(v.threads)
        self.device, self.mode = v.resolved_device(), v.resolved_mode()
        if self.device == "cpu":
            from aded_ray.verify.modes import row_invariance_warning

            if warning := row_invariance_warning(self.mode):
                log.warning(warning)
        self.widths = v.resolved_widths() if v.tp_size == 1 and not cfg.compiled_batched else []
        self.attention = v.resolved_attention(static=cfg.compiled_static, device=self.device, mode=self.mode)
        self.model_path = resolve_model(v.model)
        self.tokenizer = load_tokenizer(v.model)
        self.group = None
        if v.tp_size > 1:
            if self.mode not in ("fp32", "bf16", "fp16"):
                raise ValueError(f"mode {self.mode!r} is not available with tp_size {v.tp_size}: use fp32, bf16, fp16")
            from aded_ray.tp.group import TPGroup

            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[self.mode]
            self.model = None
            self.group = TPGroup(tp_size=v.tp_size, model=v.model, dtype=dtype, device=self.device,
                                 step_timeout_s=v.step_timeout_s, bundle_offset=tp_bundle_offset)
            self.make_verifier = self.group.verifier
        elif cfg.compiled_static:
            from aded_ray.verify.static import StaticTreeVerifier

            self.model = load_for_mode(v.model, self.mode, self.device)
            max_len = cfg.max_prompt_tokens + cfg.max_new_tokens + 2 * self.widths[-1]
            mode = "reduce-overhead" if self.device.startswith("cuda") else None   # CUDA graphs on a GPU
            self.make_verifier = lambda: StaticTreeVerifier(self.model, widths=self.widths, max_len=max_len,
                                                            compile=True, compile_mode=mode, dynamic=None if mode is None else False)
        else:
            from aded_ray.verify.target import TreeVerifier

            self.model = load_for_mode(v.model, self.mode, self.device)
            self.make_verifier = lambda: TreeVerifier(self.model, widths=self.widths, attention=self.attention)
        self.eos_ids = self._eos_ids()
        self.max_nodes = cfg.draft.max_nodes if not self.widths else min(cfg.draft.max_nodes, self.widths[-1] - 1)
        wanted = speculate and cfg.draft.method != "none" and self.max_nodes > 0
        self.exactness = check_exactness(self.make_verifier, self.mode, check_shapes(self.widths, self.max_nodes),
                                         vocab=min(len(self.tokenizer), 30000)) if wanted else None
        self.exact = self.exactness is not None and self.exactness.exact
        if self.exact and self.attention == "invariant" and not self.exactness.bitwise:
            log.warning("attention 'invariant' but tree passes differ from plain decoding by %.3g here (%s): "
                        "some operation other than attention is not row-invariant on this machine",
                        self.exactness.max_diff, self.exactness.summary())
        self.speculation_off_reason = None
        if self.exactness is not None and not self.exact:
            self.speculation_off_reason = f"not exact on this machine: {self.exactness.summary()}"
        elif not speculate or cfg.draft.method == "none" or self.max_nodes <= 0:
            self.speculation_off_reason = "turned off by configuration"
        if self.exactness is not None and not self.exact:
            log.error("SPECULATION DISABLED: verify mode %s on %s is not exact (%s); serving plain decoding only. "
                      "Use mode fp32 for speculation.", self.mode, self.device, self.exactness.summary())
        self.speculate = self.speculation_off_reason is None
        self.matrix = self._load_matrix(cfg.store, TrigramMatrix)
        self._drafter = self._make_drafter() if self.speculate else NoDraft()
        self._lock = threading.Lock()
        from aded_ray.scheduler import Scheduler
        from aded_ray.verify.batch import BatchKV, SerialKV

        buckets = v.resolved_compile_tokens() if cfg.compiled_batched else ()
        compile_mode = "reduce-overhead" if self.device.startswith("cuda") else None   # CUDA graphs on a GPU
        serial = cfg.compiled_static or cfg.max_batch == 1 and not self.widths
        if self.group is not None and not serial:     # every rank batches its own shard's KV
            make_kv = lambda: self.group.batch_kv(cfg.prefill_chunk)  # noqa: E731
        elif serial:
            make_kv = lambda: SerialKV(self.make_verifier)  # noqa: E731
        else:
            make_kv = lambda: BatchKV(self.model, prefill_chunk=cfg.prefill_chunk, widths=self.widths,  # noqa: E731
                                      compile_tokens=buckets, compile_mode=compile_mode, attention=self.attention)
        kv = make_kv()
        if buckets:
            t0 = time.perf_counter()
            kv.warm_up()          # compile every bucket now, not in the first requests' passes
            log.info("compiled batched passes for token buckets %s in %.1f s", list(buckets),
                     time.perf_counter() - t0)
        self.cost = self._pass_cost(make_kv, None if isinstance(kv, SerialKV) else kv.layout) \
            if self.speculate else None
        if self.cost is not None:
            self.cost.token_buckets = tuple(buckets)
        self.scheduler = Scheduler(kv, self.drafter if self.speculate else None, self._make_budget(v.budget),
                                   self.eos_ids, max_batch=cfg.max_batch,
                                   max_waiting=cfg.max_waiting, default_max_nodes=self.max_nodes, start=False,
                                   fuse_prefill=cfg.fuse_prefill)

    # the drafter and the budget live in the scheduler (benchmarks swap them between runs)
    @property
    def budget(self):
        return self.scheduler.budget

    @budget.setter
    def budget(self, value) -> None:
        self.scheduler.budget = value

    @property
    def drafter(self):
        return self._drafter

    @drafter.setter
    def drafter(self, value) -> None:
        self._drafter = value
        if hasattr(self, "scheduler"):
            self.scheduler.drafter = value if self.speculate else None

    def _pass_cost(self, make_kv, layout: str | None):
        """What a verification pass costs here, per (batch, width): measured on this engine's own kind of KV
        once per machine, model, mode and grid (cached; re-measured when a quick probe disagrees). ``layout``:
        the batched KV's (``None``: one request's verifier at a time)."""
        from aded_ray.paths import cache_dir
        from aded_ray.verify.cost import (PassCost, cached_pass_cost, measure_cost_curve, measure_pass_cost,
                                          pass_grid)

        v = self.config.verify
        if v.cost_curve:
            nested = all(isinstance(x, dict) for x in v.cost_curve.values())
            return PassCost(v.cost_curve if nested else {1: v.cost_curve}, self.widths)
        mode_key = self.mode if v.tp_size == 1 else f"{self.mode}-tp{v.tp_size}"
        if self.attention != "sdpa":
            mode_key += f"-{self.attention}"
        compiled = self.config.compiled_static or self.config.compiled_batched
        mode_key += f"-{self.device}" + "".join(f"-w{w}" for w in self.widths) + ("-compiled" if compiled else "")
        if self.config.compiled_batched:
            mode_key += "-t" + "-".join(str(t) for t in v.resolved_compile_tokens())
        if layout is not None:
            grid = pass_grid(self.config.max_batch, self.max_nodes + 1, self.widths,
                             max_tokens=1024 if self.device.startswith("cuda") else 256)
            # the start-up probe: one request (a batch's point would first prefill max_batch prompts, ~10 s)
            probe_grid = {1: [w for w in grid[1] if w in (1, 8)] or grid[1][:1]}
            measure = lambda g, reps=3: measure_pass_cost(make_kv, g, reps=reps, widths=self.widths)  # noqa: E731
            key = f"{self.model_path}|{mode_key}|batched-{layout}|{sorted(grid.items())}"
            return cached_pass_cost(lambda: measure(grid), lambda: measure(probe_grid, 5), key, cache_dir() / "cost")
        key = f"{self.model_path}|{mode_key}|serial"
        return cached_pass_cost(lambda: PassCost(measure_cost_curve(self.make_verifier), self.widths),
                                lambda: PassCost(measure_cost_curve(self.make_verifier, ks=(1, 8), reps=5)),
                                key, cache_dir() / "cost")

    def _make_budget(self, budget):
        from aded_ray.verify.budget import AdaptiveBudget

        if not self.speculate:
            return FixedBudget(0)
        if budget == "auto":
            return AdaptiveBudget(self.cost, max_nodes=self.max_nodes)
        return FixedBudget(min(int(budget), self.max_nodes))

    def reconfigure(self, *, max_nodes: int | None = None, budget=None) -> None:
        """Change the draft budget without a restart (takes effect at the next step / request)."""
        with self._lock:
            if max_nodes is not None:
                self.max_nodes = int(max_nodes) if not self.widths else min(int(max_nodes), self.widths[-1] - 1)
                self.scheduler.default_max_nodes = self.max_nodes
            if budget is None:
                budget = "auto" if not isinstance(self.budget, FixedBudget) else self.budget.k
            self.budget = self._make_budget(budget)

    # ---- construction helpers -----------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        return eos_token_ids(self.model, self.tokenizer, self.model_path)

    def _load_matrix(self, store, cls):
        from aded_ray.paths import default_store

        path = Path(store) if store else default_store()
        if path.is_file():
            return cls.load(path)
        if store:
            raise ValueError(f"store {store!r} does not exist; build it with `aded build-store`")
        log.warning("no store at %s: drafting from an empty matrix (it adapts as it decodes)", path)
        return cls.empty(len(self.tokenizer))

    def _make_drafter(self, matrix=None):
        """A warmed-up drafter over ``matrix`` (default: the engine's own)."""
        return make_drafter(self.config.draft, self.matrix if matrix is None else matrix)

    @property
    def busy(self) -> bool:
        """Whether any request is being decoded right now."""
        return self.scheduler.running > 0

    def load(self) -> dict:
        """What the scheduler is doing now and its cumulative per-step counts (vLLM's meanings)."""
        from dataclasses import asdict

        s = self.scheduler
        return {"running": s.running, "waiting": s.waiting, "max_batch": s.max_batch, **asdict(s.counters)}

    def compiled_info(self) -> dict | None:
        """Compiled passes, for /health: the token buckets of compiled batched passes and how many passes ran
        compiled (None when passes run eager), or the fixed widths of compiled static passes."""
        if self.config.compiled_static:
            return {"static_widths": list(self.widths)}
        kv = self.scheduler.kv
        buckets = list(getattr(kv, "compile_tokens", ()))
        return {"token_buckets": buckets, "passes": kv.compiled_passes} if buckets else None

    def healthy(self) -> bool:
        return self.group is None or self.group.healthy()

    def shutdown(self) -> None:
        self.scheduler.close()
        if self.group is not None:
            self.group.shutdown()

    # ---- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt string, or of a chat (a list of messages, or a string with ``chat=True``).
        User text never produces control tokens (:mod:`aded_ray.chat`): a marker string typed by a user
        is encoded as the text it looks like, so no user can forge a system turn."""
        from aded_ray.chat import encode_chat, encode_text

        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            ids = encode_chat(self.tokenizer, messages)
        else:
            ids = encode_text(self.tokenizer, prompt)
        param = "messages" if isinstance(prompt, list) else "prompt"
        if not ids:
            raise InvalidParameter(param, "the prompt is empty: it encodes to no tokens")
        if len(ids) > self.config.max_prompt_tokens:
            raise InvalidParameter(param, f"the prompt has {len(ids)} tokens, more than max_prompt_tokens="
                                          f"{self.config.max_prompt_tokens}")
        return ids

    def run_on_thread(self, fn):
        """``fn()`` run on the engine's thread, between two scheduler iterations (its result, or its exception
        raised here). For tensor work beside the engine, e.g. a benchmark's baselines: on a second thread it
        would start a second OpenMP pool and slow every pass of the engine (above)."""
        return self.scheduler.call(fn).result()

    def generate(self, prompt: str | list[dict] | list[int], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 chat: bool | None = None, speculate: bool = True, max_nodes: int | None = None,
                 share: bool = True) -> Iterator[Chunk]:
        """Stream a completion. Validation errors raise ``ValueError`` before any work is done; a full
        waiting queue raises :class:`aded_ray.scheduler.QueueFull`. ``prompt`` may be token ids (kept as
        they are). Closing the iterator cancels the request at the next step."""
        from aded_ray.scheduler import GenRequest

        if not 1 <= max_new_tokens <= self.config.max_new_tokens:
            raise InvalidParameter("max_tokens", f"max_new_tokens {max_new_tokens} must be in "
                                                 f"1..{self.config.max_new_tokens}")
        if max_nodes is not None and not 0 <= max_nodes <= 512:
            raise InvalidParameter("max_nodes", f"max_nodes {max_nodes} must be in 0..512")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        stops = [s for s in (stop or []) if s]
        ids = self.encode_ids(prompt) if _is_ids(prompt) else self.encode(prompt, chat)
        preamble = self.preamble_length(ids)      # (the template's text alone: the same tokens, the same KV)
        if not sampling.greedy and sampling.seed is None:
            import secrets

            sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=secrets.randbits(63))
        stats = GenerationStats()
        handle = self.scheduler.submit(GenRequest(ids, max_new_tokens, sampling, speculate, max_nodes, share,
                                                  preamble), stats)
        return self._stream(handle, stats, stops)

    def preamble_length(self, ids: list[int]) -> int:
        """How many first tokens of the chat ``ids`` are the template's own preamble: what every chat without
        a system message starts with (the template's default system turn and the user header), no user
        text, so its cached KV is shared by all users alike. 0 when ``ids`` does not start with it, or when
        the engine's config turns the cache off."""
        if not self.config.cache_preamble:
            return 0
        if self._preamble is None:
            import os

            from aded_ray.chat import encode_chat

            a, b = (encode_chat(self.tokenizer, [{"role": "user", "content": c}]) for c in ("a", "b"))
            self._preamble = a[: len(os.path.commonprefix([a, b]))]
        n = len(self._preamble)
        return n if n and ids[:n] == self._preamble else 0

    def encode_ids(self, ids) -> list[int]:
        """Validate a prompt given as token ids."""
        V = len(self.tokenizer)
        out = [int(t) for t in ids]
        if not out:
            raise InvalidParameter("prompt", "the prompt is empty: no token ids")
        bad = next((t for t in out if not 0 <= t < V), None)
        if bad is not None:
            raise InvalidParameter("prompt", f"prompt token id {bad} is outside the vocabulary (0..{V - 1})")
        if len(out) > self.config.max_prompt_tokens:
            raise InvalidParameter("prompt", f"the prompt has {len(out)} tokens, more than max_prompt_tokens="
                                             f"{self.config.max_prompt_tokens}")
        return out

    def _stream(self, handle, stats: GenerationStats, stops) -> Iterator[Chunk]:
        hold = max((len(s) for s in stops), default=1) - 1
        out_ids: list[int] = []
        sent = 0
        try:
            for new, finish in handle:
                out_ids += [t for t in new if t not in self.eos_ids]
                text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                cut = min((text.find(s) for s in stops if s in text), default=-1)
                if cut >= 0:
                    handle.cancel()
                    stats.finish_reason = "stop"
                    yield Chunk(text[sent:cut], new, "stop", stats)
                    return
                final = finish is not None
                end = len(text) if final else max(sent, len(text) - hold)
                if not final and text.endswith("\ufffd"):
                    end = max(sent, min(end, len(text) - 1))  # an incomplete UTF-8 sequence: wait for the rest
                yield Chunk(text[sent:end], new, finish, stats if final else None)
                sent = end
                if final:
                    return
        finally:
            handle.cancel()


def eos_token_ids(model, tokenizer, model_path=None) -> list[int]:
    """The model's end-of-sequence ids: its generation config's and the tokenizer's."""
    ids = set()
    gc = getattr(model, "generation_config", None)
    if gc is None and model_path is not None:
        from transformers import GenerationConfig

        try:
            gc = GenerationConfig.from_pretrained(model_path)
        except OSError:
            gc = None
    for src in (getattr(gc, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif src:
            ids.update(int(x) for x in src)
    return sorted(ids)


def make_drafter(d, matrix):
    """A warmed-up drafter of the kind ``d`` (a :class:`~aded_ray.config.DraftConfig`) over ``matrix``."""
    if d.method == "lookup":
        from aded_ray.draft.lookup import PromptLookupDrafter

        return PromptLookupDrafter(num_tokens=max(1, d.max_nodes))
    if d.method == "best":
        from aded_ray.draft.best import BestDrafter

        drafter = BestDrafter(matrix, history_tokens=d.history_tokens, window=d.window)
    else:
        from aded_ray.draft.mcts import MCTSDrafter

        drafter = MCTSDrafter(matrix, **d.mcts_kwargs())
    if hasattr(drafter, "warm_up"):
        drafter.warm_up()      # every per-step kernel, with the decode loop's types
        return drafter
    warm = [0, 1, 0, 1]
    drafter.observe(warm)  # compile the numba kernels now, not in the first request
    drafter.draft(warm, 4)
    matrix.reset_deltas()
    if hasattr(drafter, "reset"):
        drafter.reset()
    return drafter


def _is_ids(prompt) -> bool:
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(t, (int,)) and not isinstance(t, bool) for t in prompt)
