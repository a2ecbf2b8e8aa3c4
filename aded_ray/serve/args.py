"""What ``deployments/aded.yaml`` sets under ``args`` (:class:`AppArgs`) and under ``user_config``
(:class:`UserConfig`, applied by ``reconfigure`` without a restart). Every field has a safe default."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from aded_ray.config import DraftConfig, EngineConfig, VerifyConfig

MiB = 1 << 20


class AppArgs(BaseModel):
    """Everything ``deployments/aded.yaml`` can set under ``args`` (all optional)."""

    model_config = ConfigDict(extra="forbid")
    model: str = "smollm2"
    served_model_name: str = "smollm2"
    store: str | None = Field(None, description="tri-gram store file; default: the ShareGPT store if built")
    redis_url: str | None = Field(None, description="shared store; default $ADED_REDIS_URL; 'off' disables")
    num_replicas: int | Literal["auto"] = Field(1, description='a number, or "auto" (Serve autoscaling)')
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    tp_size: int = Field(1, ge=1, le=64, description="tensor-parallel ranks (DeepSpeed AutoTP actors) per replica")
    cpus_per_rank: float = Field(0.5, gt=0, description="CPUs reserved per rank actor (CPU tensor parallelism)")
    step_timeout_s: float = Field(60.0, gt=0, description="a tensor-parallel step longer than this fails")
    mode: str = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1)
    compile: Literal["auto"] | bool = Field(False, description="compiled passes: per token bucket for batched "
                                            "replicas, static-KV with max_running 1 (minutes of compiling at "
                                            "start-up); auto: batched replicas on CPUs in mode fp32-mkl only")
    compile_tokens: Literal["auto"] | list[int] = Field("auto", description="token buckets of compiled batched "
                                                        "passes (auto: [1, 2, 4, 8, 16, 32] on CPUs)")
    attention: Literal["auto", "sdpa", "invariant"] = Field(
        "auto", description="attention kernel: invariant (tree rows equal plain decoding's bit for bit; the "
                            "auto choice on CPUs in the float32 modes) or sdpa")
    draft: DraftConfig = DraftConfig()
    budget: Literal["auto"] | int = "auto"
    max_prompt_tokens: int = Field(4096, ge=1)
    max_new_tokens: int = Field(1024, ge=1)
    default_max_tokens: int = Field(16, ge=1)
    # ---- capacity: generations are admitted by the replica; cheap routes never wait behind them ----------
    max_running: int = Field(4, ge=1, le=1024, description="generations decoding at once in a replica")
    max_waiting: int = Field(12, ge=0, le=4096, description="generations waiting in a replica for a slot; "
                                                            "past that: 503 with Retry-After")
    max_ongoing_requests: int | None = Field(None, ge=1, description="Serve's per-replica limit on requests of "
                                             "any kind; default max_running + max_waiting + 16, so /health "
                                             "and /v1/models always find a slot")
    max_queued_requests: int = Field(16, ge=-1, description="Serve's router queue; past that: 503")
    # ---- request limits (the proxy guard enforces the body limits first, see aded_ray.serve.proxy) ------
    max_body_bytes: int = Field(MiB, ge=1024, description="largest request body")
    body_timeout_s: float = Field(15.0, gt=0, description="time to receive a request body")
    max_prompt_chars: int | None = Field(None, ge=1, description="characters of user text in a request, checked "
                                         "before tokenization; default 32 x max_prompt_tokens")
    # ---- privacy of the shared drafting state ---------------------------------------------------------
    namespace: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                                  description="tenant namespace of the shared state in Redis; default: the "
                                              "Serve application's name (deployments do not share)")
    share_history: bool = Field(True, description="publish finished requests' tokens to the namespace's shared "
                                                  "history (and read the others'); false keeps them local")
    private_by_default: bool = Field(False, description="requests that do not set 'private' are private")
    allow_return_stats: bool = Field(True, description="honour the return_stats request field")
    history_max_entries: int = Field(1000, ge=0, le=100_000, description="shared history: requests kept")
    history_retention_s: float = Field(3600.0, gt=0, description="shared history and delta log: oldest kept")
    state_ttl_s: float = Field(7 * 86400.0, ge=0, description="shared counts expire after this long without "
                                                              "writes (0: never)")
    flush_interval_s: float = Field(0.2, gt=0, le=60)

    @model_validator(mode="after")
    def _capacity(self):
        if self.max_ongoing_requests is not None and self.max_ongoing_requests < self.max_running + self.max_waiting + 2:
            raise ValueError(f"max_ongoing_requests {self.max_ongoing_requests} must be at least max_running + "
                             f"max_waiting + 2 = {self.max_running + self.max_waiting + 2}, or /health would "
                             "queue behind generations")
        return self

    @property
    def serve_max_ongoing(self) -> int:
        return self.max_ongoing_requests or self.max_running + self.max_waiting + 16

    @property
    def autoscale_target(self) -> int:
        """Serve autoscaling's ``target_ongoing_requests``: three quarters of the engine's batch, so a replica
        is added before requests start waiting for a place in a full batch."""
        return max(1, round(0.75 * self.max_running))

    @property
    def prompt_chars(self) -> int:
        return self.max_prompt_chars or 32 * self.max_prompt_tokens

    def engine_config(self) -> EngineConfig:
        batch = {}   # an engine that batches requests gets the replica's admission limit as its batch size
        if "max_batch" in EngineConfig.model_fields:
            batch["max_batch"] = self.max_running
        return EngineConfig(store=self.store, draft=self.draft, max_prompt_tokens=self.max_prompt_tokens,
                            max_new_tokens=self.max_new_tokens, **batch,
                            verify=VerifyConfig(model=self.model, mode=self.mode, device=self.device,
                                                threads=self.threads, budget=self.budget, tp_size=self.tp_size,
                                                compile=self.compile, compile_tokens=self.compile_tokens,
                                                attention=self.attention, step_timeout_s=self.step_timeout_s))


class UserConfig(BaseModel):
    """Tunables applied without a restart (``user_config`` / ``reconfigure``)."""

    model_config = ConfigDict(extra="forbid")
    max_nodes: int | None = Field(None, ge=0, le=512)
    budget: Literal["auto"] | int | None = None
    flush_interval_s: float | None = Field(None, gt=0, le=60)
