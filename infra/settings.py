"""Process settings: read from the environment once, at the entry point, then frozen.

Every process (worker, engine, CLI command) builds one `Settings` in its `main` and passes it
down; library code never reads `os.environ`, so tests can run many isolated pipelines (own topic
prefix, consumer group and Redis key prefix) inside one interpreter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class RewardEndpoint(BaseModel):
    """An HTTP reward model or judge (`workers/rewards/http.py`): POST a list of groups, get
    one score per completion back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(min_length=1)
    version: int = Field(default=1, ge=0)
    """Recorded with every reward it gives; bump it when the judge's scoring changes."""
    timeout_s: float = Field(default=10.0, gt=0.0)
    retries: int = Field(default=3, ge=0)
    """Attempts after the first for a failed call (timeout, connection error, 5xx, 429)."""
    backoff_s: float = Field(default=0.2, gt=0.0)
    """First retry delay; doubled per attempt, with jitter."""
    max_groups_per_call: int = Field(default=32, ge=1)
    """Groups one call carries (each group's completions always travel together)."""
    max_concurrency: int = Field(default=64, ge=1)
    """Calls in flight at once per process."""
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive failed calls that open the circuit: calls fail fast while it is open."""
    breaker_reset_s: float = Field(default=10.0, gt=0.0)
    """How long the circuit stays open before one trial call may close it again."""


class Settings(BaseSettings):
    """Connection and pipeline settings, `LORASTREAM_*` in the environment."""

    model_config = SettingsConfigDict(env_prefix="LORASTREAM_", frozen=True, extra="ignore")

    # Where the real services are. The same code runs against an existing cluster.
    bootstrap_servers: str = "127.0.0.1:9092"
    redis_url: str = "redis://127.0.0.1:6379/0"
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    # TLS (security protocol SSL or SASL_SSL): CA bundle, and a client certificate for mTLS.
    # Redis AUTH and TLS ride in `redis_url` (`rediss://:PASSWORD@host:6380/0?ssl_ca_certs=...`),
    # which every Redis client is built from.
    kafka_ssl_cafile: str | None = None
    kafka_ssl_certfile: str | None = None
    kafka_ssl_keyfile: str | None = None

    # Names: every topic, consumer group and Redis key carries a prefix, so tenants and tests
    # never collide.
    topic_prefix: str = "lorastream."
    app_id: str = "lorastream"
    redis_prefix: str = "lorastream:"
    partitions: int = 4

    # Local state.
    data_dir: Path = REPO_ROOT / ".data"
    artifact_dir: Path | None = None
    artifact_url: str | None = None
    """A shared copy of the artifact store that every host reaches (`s3://bucket/prefix`,
    `file:///mnt/shared/lorastream`); the local artifact dir is then its cache."""
    s3_endpoint_url: str | None = None
    """An S3-compatible server (SeaweedFS, MinIO, ...): `http://host:port`; unset = AWS."""
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_region: str | None = None
    base_model: Path | None = None
    """The shared base: a local directory, or a hub id (`org/name`) already in the local
    Hugging Face cache (never downloaded at run time). Its architecture must be in the registry
    (`workers/models/registry.py`); anything else is refused when a worker starts."""
    lora_targets: str = "all"
    """What carries LoRA: groups `attn`, `mlp`, `shared`, `experts` (`all`: every group the
    base has) and/or module leaf names (`q_proj,v_proj`), comma-separated."""
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:[0-9]+)?)$")
    """Where the trainer and the embedded engine run: `cpu` or `cuda` (`cuda:N`)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """The base's dtype in the trainer and the embedded engine (LoRA factors stay float32)."""

    # Serving engine the rollout and evaluate stages sample from: an SGLang server (or
    # `lorastream engine`) at this URL; unset = an embedded CPU engine on a loopback port.
    engine_url: str | None = None
    engine_max_loaded: int = Field(default=64, ge=1)
    engine_threads: int = Field(default=1, ge=0)
    """Intra-op threads of the embedded engine (0: torch's default, one per core); unused with
    `engine_url`. One by default: the embedded engine shares its process with the trainer's
    thread, and two multi-threaded OpenMP teams in one process make libgomp put every barrier
    to sleep once their threads outnumber the cores (`workers.serving.cpu_engine`; the demo's
    training with 1 and 2 threads: docs/performance.md)."""
    engine_admin_token: SecretStr | None = None
    """Bearer token an engine requires on /load_lora_adapter and /unload_lora_adapter (SGLang's
    `--admin-api-key`); clients that load adapters send it."""

    # Faust / consumer behaviour. Faust's 60 s default session timeout makes groups slow to
    # (re)join; lower it for local and test runs.
    session_timeout_s: float = 10.0
    heartbeat_interval_s: float = 1.0
    web_port: int = 0

    # GRPO and pipeline knobs.
    group_size: int = Field(default=6, ge=2)
    max_new_tokens: int = Field(default=8, ge=1)
    temperature: float = Field(default=1.0, gt=0.0)
    learning_rate: float = Field(default=1e-2, gt=0.0)
    lora_rank: int = Field(default=4, ge=1)
    lora_alpha: float = 8.0
    kl_beta: float = Field(default=0.0, ge=0.0)
    clip_eps: float = Field(default=0.2, gt=0.0)
    dpo_beta: float = Field(default=0.1, gt=0.0)
    """DPO's beta (how far from the base a dpo policy may move per unit of preference)."""
    dpo_sft_weight: float = Field(default=0.0, ge=0.0)
    """Weight of the chosen answers' NLL added to DPO's loss (RPO; 0: plain DPO)."""
    export_every: int = Field(default=2, ge=1)
    promote_margin: float = 0.0
    update_batch: int = Field(default=4, ge=1)
    """Most rollout groups of one policy that one GRPO step trains on."""
    max_in_flight: int = Field(default=4, ge=1)
    """Rollout groups a policy may have sampled but not yet trained on (bounds staleness)."""
    stream_batch: int = Field(default=500, ge=1)
    """Most events an unbatched stage takes off its stream at once; seen-checks and marks go
    to Redis once per batch, and the batch is acked when it is done."""
    seed: int = 0
    trainer_max_policies: int = Field(default=256, ge=1)
    """Most policies an update worker keeps in memory; beyond, the least recently stepped are
    evicted to their journaled checkpoint (15-20 MB each for SmolLM2)."""
    trainer_idle_evict_s: float = Field(default=600.0, gt=0.0)
    """A policy not stepped for this long is evicted from the trainer's memory."""

    # Rewards beyond the built-ins and installed plugins (`workers/rewards/registry.py`).
    reward_plugins: dict[str, str] = Field(default_factory=dict)
    """Reward name -> `module:function`, for reward code that is not an installed plugin."""
    reward_endpoints: dict[str, RewardEndpoint] = Field(default_factory=dict)
    """Reward name -> an HTTP judge, e.g. `{"my-judge": {"url": "http://judge:8080/score"}}`."""

    # Guards (see `workers/pipeline/guards.py`). Unknown policy = a syntactically valid id that is
    # not registered in the catalog, checked only when `require_registered_policies` is on.
    require_registered_policies: bool = False
    max_grad_norm_reject: float | None = Field(default=None, gt=0.0)
    """Reject (and pause the policy) when a step's pre-clip gradient norm exceeds this."""
    online_rollback_threshold: float | None = None
    """Roll serving back when the mean reward of rollouts sampled from it falls below this."""
    online_rollback_window: int = Field(default=8, ge=1)
    """How many of the serving revision's latest rollout groups that mean is taken over."""
    feedback_rollback: bool = True
    """Roll serving back when production feedback (the gateway's `/v1/feedback`) on it is worse
    than on the revision that served before (`workers/catalog/online.py`)."""
    feedback_rollback_window: int = Field(default=50, ge=1)
    """How many of a revision's latest feedback scores its mean is taken over."""
    feedback_rollback_min_count: int = Field(default=10, ge=1)
    """Feedback scores both revisions need before production feedback decides anything."""
    feedback_rollback_margin: float = Field(default=0.2, ge=0.0)
    """Roll back when the serving mean is below the previous revision's by more than this."""

    # The gateway (`lorastream gateway`).
    gateway_cold_timeout_s: float = Field(default=30.0, gt=0.0)
    """How long a request waits for a cold load before a 503 with Retry-After."""
    gateway_served_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of answers logged to the `served` topic."""
    gateway_answer_ttl_s: int = Field(default=86400, ge=1)
    """How long an answer can receive feedback (its prompt and text are kept that long)."""
    fault_point: str | None = None
    """Test-only crash hook (`workers/pipeline/faults.py`): `os._exit(137)` at the named point."""

    @property
    def artifacts(self) -> Path:
        """Content-addressed artifact store (adapter revisions, trainer checkpoints)."""
        return self.artifact_dir or (self.data_dir / "artifacts")

    def topic(self, name: str) -> str:
        """Full topic name for a logical pipeline topic."""
        return f"{self.topic_prefix}{name}"

    def key(self, *parts: str | int) -> str:
        """Full Redis key for a logical key path."""
        return self.redis_prefix + ":".join(map(str, parts))


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process build exactly these settings."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str)
        env[f"LORASTREAM_{name.upper()}"] = str(value)
    return env
