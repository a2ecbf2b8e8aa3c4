"""One set of typed settings for the CLI, the Serve YAML ``args``, ``user_config`` and the tests.

Bad values fail early with pydantic's ``ValidationError`` (a ``ValueError``) naming the field and value.
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aded_ray.verify.modes import MODES


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DraftConfig(_Strict):
    """The drafter. ``best``: aded_ray's probability-ranked tree (request + history suffix matching, the
    adaptive tri-gram matrix and the model's recycled predictions, combined by an online-learned model);
    ``aded``: the authors' MCTS (its settings below are the authors' defaults);
    ``lookup``: prompt lookup; ``none``: plain decoding."""

    method: Literal["best", "aded", "lookup", "none"] = "best"
    iterations: int = Field(150, ge=0, le=100_000)
    depth: int = Field(3, ge=1, le=16)
    c1: float = Field(32.0, gt=0)
    c2: float = Field(8.0, gt=0)
    top_sentences: int = Field(24, ge=1, le=1024)
    choices: int = Field(64, ge=1, le=1024)
    max_nodes: int = Field(64, ge=0, le=512)
    reward: Literal["shipped", "intended"] = "shipped"
    shuffle_children: bool = True
    window: int = Field(16, ge=3, le=4096)
    seed: int = 0

    history_tokens: int = Field(262_144, ge=0, le=1 << 26)

    def mcts_kwargs(self) -> dict:
        return self.model_dump(exclude={"method", "history_tokens"})


class VerifyConfig(_Strict):
    """The target model and how it runs."""

    model: str = "smollm2"
    mode: Literal[("auto",) + MODES] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, le=1024)
    budget: Literal["auto"] | int = "auto"
    tp_size: int = Field(1, ge=1, le=64, description="tensor-parallel ranks (DeepSpeed AutoTP actors) when > 1")
    step_timeout_s: float = Field(60.0, gt=0, description="a tensor-parallel step longer than this fails")
    # Fixed pass widths (tokens per pass after the prefill; every pass padded to the smallest that holds it):
    # "auto" = [64] on CUDA (a pass costs the same for 1 and 64 tokens there; fixed shapes), none on CPU.
    widths: Literal["auto"] | list[int] = "auto"
    # ms per verification pass: {width: ms} for one request (e.g. {1: 34, 8: 40, 64: 133}; more requests cost
    # proportionally more) or {batch: {width: ms}}; None = measure at start-up on the engine's own batched KV
    # (once per machine, model, mode and batch grid; cached in $ADED_CACHE_DIR/cost)
    cost_curve: dict[int, float] | dict[int, dict[int, float]] | None = None
    # Compiled passes (torch.compile; inductor with frozen weights on CPUs, calling fp32-mkl's packed linears
    # where torch has MKL; CUDA graphs on GPUs; mode fp32-mkl/fp32/bf16/fp16). With max_batch > 1: the batched
    # ragged pass compiled per token bucket (`compile_tokens`: a pass of T tokens runs the graph of the
    # smallest bucket >= T; larger passes, prefills and fused prompt chunks run eager); with max_batch 1: a
    # static single-request KV cache and fixed `widths`. Off by default (an Engine built in a notebook or a
    # test starts in seconds): compiling takes minutes at start-up (~25 s per bucket on the 2-core CPU).
    # "auto": the batched pass compiled on CPUs where the mode is fp32-mkl (measured faster at every
    # concurrency, README "Compiled batched passes"), max_batch > 1 and tp_size 1; never on CUDA until a GPU
    # run measures it (`make gpu-check`). The deployment (deployments/aded.yaml) sets it.
    compile: Literal["auto"] | bool = False
    compile_tokens: Literal["auto"] | list[int] = "auto"
    # Attention kernel: "invariant" computes a query row from its own keys alone, in a fixed order, so a
    # tree pass's rows equal plain decoding's bit for bit (sampled outputs cannot flip on a rounding;
    # aded_ray/verify/invariant_attention.py; float32 on CPUs, measured +0-15% per pass against SDPA);
    # "sdpa": torch's (rows agree with plain decoding to ~5e-5). "auto": invariant on CPUs in the float32
    # modes with tp_size 1 (not the compiled static path), sdpa elsewhere.
    attention: Literal["auto", "sdpa", "invariant"] = "auto"

    @model_validator(mode="after")
    def _compile_needs_plain_weights(self):
        if self.compile is True and self.mode.endswith("-packed"):
            raise ValueError(f"compile=True needs fp32 or fp32-mkl weights (the compiler cannot see into oneDNN's "
                             f"packing), mode is {self.mode!r}")
        if self.compile is True and self.tp_size > 1:
            raise ValueError(f"compile=True runs on one device, tp_size is {self.tp_size}")
        if self.compile_tokens != "auto" and (not self.compile_tokens or
                                              any(t < 1 or t > 4096 for t in self.compile_tokens)):
            raise ValueError(f"compile_tokens {self.compile_tokens} must be one or more token counts in 1..4096")
        return self

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        if self.resolved_device() == "cuda":
            return "fp32"   # exact (TF32 off); fp16/bf16 must pass the start-up check to speculate
        if self.tp_size > 1:
            return "fp32"  # AutoTP shards nn.Linear: no pre-packing
        from aded_ray.verify.modes import preferred_cpu_mode

        # the packed linears whose kernels a probe of this machine finds row-invariant (a row's bits do not
        # depend on the rows beside it), MKL's where both are and it is no slower than oneDNN's (1.3-1.5x faster
        # on the Xeon measured; ~2x slower and not row-invariant on the AMD EPYC; verify/modes.py); compiled
        # graphs call the same packed weights (one copy for the eager passes and every compiled shape)
        mode = preferred_cpu_mode()
        if self.compile is True and mode != "fp32-mkl":
            return "fp32"  # the compiler packs by itself (a copy per compiled shape)
        return mode

    def resolved_attention(self, static: bool = False, device: str | None = None, mode: str | None = None) -> str:
        """The attention kernel: see ``attention``. ``static``: the compiled static single-request path
        (which has no invariant attention); ``device``/``mode``: already resolved (else resolved here). Raises
        ``ValueError`` naming the setting where "invariant" cannot run (a GPU, a half-precision mode, tensor
        parallelism, the static path)."""
        device = device or self.resolved_device()
        mode = mode or self.resolved_mode()
        fits = device == "cpu" and mode in ("fp32", "fp32-packed", "fp32-mkl") and self.tp_size == 1 and not static
        if self.attention == "auto":
            return "invariant" if fits else "sdpa"
        if self.attention == "invariant" and not fits:
            raise ValueError(f"attention 'invariant' runs float32 passes on a CPU with tp_size 1 and no static "
                             f"compiled path; here device {device!r}, mode {mode!r}, "
                             f"tp_size {self.tp_size}{', static compiled passes' if static else ''}")
        return self.attention

    def resolved_compile_tokens(self) -> list[int]:
        """Token buckets of compiled batched passes: "auto" = [1, 2, 4, 8, 16, 32] on CPUs (each costs a
        compile at start-up; a CPU replica runs a few requests with small trees), up to 256 on CUDA."""
        if self.compile_tokens != "auto":
            return sorted(set(self.compile_tokens))
        if self.resolved_device() == "cuda":
            return [1, 2, 4, 8, 16, 32, 64, 128, 256]
        return [1, 2, 4, 8, 16, 32]

    def resolved_widths(self) -> list[int]:
        if self.widths == "auto" and self.compile is True:   # compiled passes need fixed shapes on any device
            # a GPU pass costs about the same for 1 and 64 tokens; a CPU pass grows with its width, so small
            # trees need small widths (measured, `aded bench-compile`: with [1, 8, 16, 64] a 2-token tree
            # paid the 8-token pass and the budget stopped drafting; with [1, 2, 4, 8, 16] it drafts and
            # beats the compiled plain loop)
            return [1, 8, 16, 64] if self.resolved_device() == "cuda" else [1, 2, 4, 8, 16]
        if self.widths != "auto":
            if any(w < 1 or w > 4096 for w in self.widths):
                raise ValueError(f"widths {self.widths} must be token counts in 1..4096")
            return sorted(set(self.widths))
        return [64] if self.resolved_device() == "cuda" else []


class EngineConfig(_Strict):
    store: str | None = None
    draft: DraftConfig = DraftConfig()
    verify: VerifyConfig = VerifyConfig()
    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(2048, ge=1)
    # continuous batching: requests decoded together (one forward pass per step), requests allowed to wait,
    # prompt tokens per prefill pass (a newcomer delays running streams by at most one such pass)
    max_batch: int = Field(32, ge=1, le=1024)
    max_waiting: int = Field(256, ge=0, le=100_000)
    prefill_chunk: int = Field(512, ge=16, le=65536)
    # the chat template's own preamble (its default system turn and the user header: no user text) is
    # prefilled once and its KV copied into every chat request that starts with it
    cache_preamble: bool = True
    # while requests run, a newcomer's prompt chunk is prefilled in their decoding pass (one read of the
    # weights for both) instead of a pass of its own that stalls them
    fuse_prefill: bool = True

    @model_validator(mode="after")
    def _compiled_batched_passes_are_ragged(self):
        if self.verify.compile is True and self.max_batch > 1 and self.verify.widths != "auto":
            raise ValueError(f"verify.compile with max_batch {self.max_batch} compiles ragged passes per token "
                             f"bucket (verify.compile_tokens): fixed widths {self.verify.widths} apply only to "
                             "max_batch 1")
        return self

    @property
    def compiled_batched(self) -> bool:
        """Whether passes are the batched ragged pass compiled per token bucket (``compile: auto`` resolved:
        on CPUs in mode fp32-mkl only)."""
        v = self.verify
        if self.max_batch <= 1 or v.tp_size != 1 or v.compile is False:
            return False
        if v.compile == "auto" and v.widths != "auto":
            return False          # fixed widths asked for: the eager padded passes they mean
        return v.compile is True or (v.resolved_device() == "cpu" and v.resolved_mode() == "fp32-mkl")

    @property
    def compiled_static(self) -> bool:
        """Whether passes are the single-request static-KV pass compiled per width (explicit ``compile: true``
        with ``max_batch`` 1)."""
        return self.verify.compile is True and self.max_batch == 1 and self.verify.tp_size == 1
