"""The engine: tokenizer + target model + drafter + budget, one request at a time. No Ray in here.

``Engine.generate(prompt, ...)`` yields :class:`Chunk` objects with new text as tokens are committed and
ends with one whose ``finish_reason`` is set ("stop" for EOS or a stop string, "length" for the limit).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from aded_ray.config import EngineConfig
from aded_ray.decode import FixedBudget, GenerationStats, NoDraft, generate_ids
from aded_ray.verify.accept import SamplingParams

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stats: GenerationStats | None = field(default=None, repr=False)


class Engine:
    def __init__(self, config: EngineConfig | None = None, *, speculate: bool = True,
                 tp_bundle_offset: int | None = None):
        from aded_ray.draft.matrix import TrigramMatrix
        from aded_ray.paths import cache_dir
        from aded_ray.verify.budget import CostCurve, cached_cost_curve
        from aded_ray.verify.loading import load_tokenizer, resolve_model
        from aded_ray.verify.exactness import check_exactness, check_shapes
        from aded_ray.verify.modes import load_for_mode

        self.config = cfg = config or EngineConfig()
        v = cfg.verify
        if v.threads:
            torch.set_num_threads(v.threads)
        self.device, self.mode = v.resolved_device(), v.resolved_mode()
        self.widths = v.resolved_widths() if v.tp_size == 1 else []
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
        else:
            from aded_ray.verify.target import TreeVerifier

            self.model = load_for_mode(v.model, self.mode, self.device)
            self.make_verifier = lambda: TreeVerifier(self.model, widths=self.widths)
        self.eos_ids = self._eos_ids()
        self.max_nodes = cfg.draft.max_nodes if not self.widths else min(cfg.draft.max_nodes, self.widths[-1] - 1)
        wanted = speculate and cfg.draft.method != "none" and self.max_nodes > 0
        self.exactness = check_exactness(self.make_verifier, self.mode, check_shapes(self.widths, self.max_nodes),
                                         vocab=min(len(self.tokenizer), 30000)) if wanted else None
        self.exact = self.exactness is not None and self.exactness.exact
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
        self.drafter = self._make_drafter() if self.speculate else NoDraft()
        self.cost = None
        if self.speculate:
            mode_key = self.mode if v.tp_size == 1 else f"{self.mode}-tp{v.tp_size}"
            mode_key += f"-{self.device}" + "".join(f"-w{w}" for w in self.widths)
            self.cost = (CostCurve(v.cost_curve) if v.cost_curve else
                         cached_cost_curve(self.make_verifier, str(self.model_path), mode_key, cache_dir() / "cost"))
        self._lock = threading.Lock()
        self.budget = self._make_budget(v.budget)

    def _make_budget(self, budget):
        from aded_ray.verify.budget import AdaptiveBudget

        if not self.speculate:
            return FixedBudget(0)
        if budget == "auto":
            return AdaptiveBudget(self.cost, max_nodes=self.max_nodes)
        return FixedBudget(min(int(budget), self.max_nodes))

    def reconfigure(self, *, max_nodes: int | None = None, budget=None) -> None:
        """Change the draft budget without a restart (takes effect at the next request)."""
        with self._lock:
            if max_nodes is not None:
                self.max_nodes = int(max_nodes) if not self.widths else min(int(max_nodes), self.widths[-1] - 1)
            if budget is None:
                budget = "auto" if not isinstance(self.budget, FixedBudget) else self.budget.k
            self.budget = self._make_budget(budget)

    # ---- construction helpers -----------------------------------------------------------------
    def _eos_ids(self) -> list[int]:
        ids = set()
        gc = getattr(self.model, "generation_config", None)
        if gc is None:
            from transformers import GenerationConfig

            try:
                gc = GenerationConfig.from_pretrained(self.model_path)
            except OSError:
                gc = None
        for src in (getattr(gc, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(int(x) for x in src)
        return sorted(ids)

    def _load_matrix(self, store, cls):
        from aded_ray.paths import default_store

        path = Path(store) if store else default_store()
        if path.is_file():
            return cls.load(path)
        if store:
            raise ValueError(f"store {store!r} does not exist; build it with `aded build-store`")
        log.warning("no store at %s: drafting from an empty matrix (it adapts as it decodes)", path)
        return cls.empty(len(self.tokenizer))

    def _make_drafter(self):
        d = self.config.draft
        if d.method == "lookup":
            from aded_ray.draft.lookup import PromptLookupDrafter

            return PromptLookupDrafter(num_tokens=max(1, d.max_nodes))
        if d.method == "best":
            from aded_ray.draft.best import BestDrafter

            drafter = BestDrafter(self.matrix, history_tokens=d.history_tokens, window=d.window)
        else:
            from aded_ray.draft.mcts import MCTSDrafter

            drafter = MCTSDrafter(self.matrix, **d.mcts_kwargs())
        warm = [0, 1, 0, 1]
        drafter.observe(warm)  # compile the numba kernels now, not in the first request
        drafter.draft(warm, 4)
        self.matrix.reset_deltas()
        if hasattr(drafter, "reset"):
            drafter.reset()
        return drafter

    @property
    def busy(self) -> bool:
        """Whether a generation is running right now (the engine decodes one request at a time)."""
        return self._lock.locked()

    def healthy(self) -> bool:
        return self.group is None or self.group.healthy()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()

    # ---- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict], chat: bool | None = None) -> list[int]:
        """Token ids of a prompt string, or of a chat (a list of messages, or a string with ``chat=True``)."""
        if isinstance(prompt, list) or chat:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        else:
            ids = self.tokenizer(prompt)["input_ids"]
        if not ids:
            raise ValueError("the prompt is empty: it encodes to no tokens")
        if len(ids) > self.config.max_prompt_tokens:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than max_prompt_tokens="
                             f"{self.config.max_prompt_tokens}")
        return ids

    def generate(self, prompt: str | list[dict], *, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                 chat: bool | None = None, speculate: bool = True) -> Iterator[Chunk]:
        """Stream a completion. Validation errors raise ``ValueError`` before any work is done."""
        if not 1 <= max_new_tokens <= self.config.max_new_tokens:
            raise ValueError(f"max_new_tokens {max_new_tokens} must be in 1..{self.config.max_new_tokens}")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        stops = [s for s in (stop or []) if s]
        ids = self.encode(prompt, chat)
        return self._stream(ids, max_new_tokens, sampling, stops, speculate)

    def _stream(self, ids, max_new_tokens, sampling, stops, speculate) -> Iterator[Chunk]:
        stats = GenerationStats()
        hold = max((len(s) for s in stops), default=1) - 1
        with self._lock:
            drafter = self.drafter if speculate else NoDraft()
            budget = self.budget if speculate else FixedBudget(0)
            out_ids: list[int] = []
            sent = 0
            gen = generate_ids(self.make_verifier(), drafter, ids, max_new_tokens=max_new_tokens,
                               sampling=sampling, eos_ids=self.eos_ids, budget=budget, stats=stats)
            try:
                for new in gen:
                    out_ids += [t for t in new if t not in self.eos_ids]
                    text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
                    cut = min((text.find(s) for s in stops if s in text), default=-1)
                    if cut >= 0:
                        stats.finish_reason = "stop"
                        yield Chunk(text[sent:cut], new, "stop", stats)
                        return
                    final = stats.finish_reason is not None
                    end = len(text) if final else max(sent, len(text) - hold)
                    if not final and text.endswith("\ufffd"):
                        end = max(sent, min(end, len(text) - 1))  # an incomplete UTF-8 sequence: wait for the rest
                    yield Chunk(text[sent:end], new, stats.finish_reason, stats if final else None)
                    sent = end
            finally:
                gen.close()
