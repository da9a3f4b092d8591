"""What a stage needs besides its input event, built once per process.

The heavy parts (base model in the engine, the trainer) are created on first use, so a process
that runs only cheap stages (reward, promote) never loads a model.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from infra.settings import Settings
from schemas.events import SourcePosition
from workers.catalog.entries import RevisionPointer, serve_name
from workers.catalog.index import CatalogIndex
from workers.pipeline.configs import PolicyConfigs
from workers.pipeline.state import PolicyState
from workers.rewards.registry import Rewards

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from workers.artifacts.store import ArtifactStore
    from workers.catalog.writer import Catalog
    from workers.models.base import LoraSpec
    from workers.serving.sampling import EmbeddedEngine, EngineSampler
    from workers.training.multitrainer import MultiPolicyTrainer


@dataclass
class StageContext:
    """Per-process dependencies of the stage functions."""

    settings: Settings
    state: PolicyState
    index: CatalogIndex
    rewards: Rewards = field(default_factory=Rewards.builtins)
    """Every reward this process knows (built-ins, plugins, HTTP judges), loaded at start-up."""
    configs: PolicyConfigs = field(init=False)
    """Each policy's effective configuration (its catalog record over the settings)."""
    _engine: EngineSampler | None = field(default=None, repr=False)
    _embedded: EmbeddedEngine | None = field(default=None, repr=False)
    _trainer: MultiPolicyTrainer | None = field(default=None, repr=False)
    _store: ArtifactStore | None = field(default=None, repr=False)
    _catalog: Catalog | None = field(default=None, repr=False)
    _sources: dict[str, tuple[str, int, int]] = field(default_factory=dict, repr=False)
    _base: Path | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _tokenizer: PreTrainedTokenizerBase | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.configs = PolicyConfigs(self.settings, self.index)

    @classmethod
    def create(cls, settings: Settings) -> StageContext:
        """A misconfigured reward (a plugin that does not load, a name defined twice) raises
        here, so a worker stops at start-up instead of dead-lettering good events."""
        state = PolicyState(settings)
        return cls(settings=settings, state=state, index=CatalogIndex(settings, state.r),
                   rewards=Rewards.load(settings))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The base model's tokenizer alone (logged targets need no engine)."""
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(str(self.base_path))
            return self._tokenizer

    @property
    def base_path(self) -> Path:
        """The base as a local directory (a hub id resolves to its local cache snapshot)."""
        if self.settings.base_model is None:
            raise RuntimeError("no base model configured: set LORASTREAM_BASE_MODEL")
        if self._base is None:
            from workers.models.base import resolve_base

            self._base = resolve_base(self.settings.base_model)
        return self._base

    @property
    def lora(self) -> LoraSpec:
        from workers.models.base import LoraSpec
        from workers.models.registry import parse_targets

        s = self.settings
        return LoraSpec(rank=s.lora_rank, alpha=s.lora_alpha,
                        target_modules=parse_targets(s.lora_targets))

    @property
    def store(self) -> ArtifactStore:
        with self._lock:
            if self._store is None:
                from workers.artifacts.store import ArtifactStore

                self._store = ArtifactStore.for_settings(self.settings)
            return self._store

    def note_source(self, event_id: str, topic: str | None, partition: int | None,
                    offset: int | None) -> None:
        """The agent notes where an input came from, so a stage can record provenance. Kept as
        a tuple: every ingested event is noted, few are ever asked for (a model per event was a
        measurable share of the ingest path)."""
        if topic is not None and partition is not None and offset is not None:
            self._sources[event_id] = (topic, partition, offset)

    def source_of(self, event_id: str) -> SourcePosition | None:
        where = self._sources.get(event_id)
        if where is None:
            return None
        return SourcePosition(topic=where[0], partition=where[1], offset=where[2])

    def forget_sources(self, event_ids: Iterable[str]) -> None:
        for event_id in event_ids:
            self._sources.pop(event_id, None)

    @property
    def catalog(self) -> Catalog:
        """The catalog writer (revisions, evaluations, aliases), sharing this process's Redis."""
        with self._lock:
            if self._catalog is None:
                from workers.catalog.writer import Catalog

                self._catalog = Catalog(self.settings, self.state.r, self.index)
            return self._catalog

    @property
    def engine(self) -> EngineSampler:
        """Sampling through SGLang's HTTP API: `engine_url`, or an embedded CPU engine."""
        with self._lock:
            if self._engine is None:
                from workers.serving.sampling import EmbeddedEngine, EngineSampler

                url = self.settings.engine_url
                secret = self.settings.engine_admin_token
                token = secret.get_secret_value() if secret else None
                if url is None:
                    s = self.settings
                    self._embedded = EmbeddedEngine(
                        self.base_path, max_loaded_loras=s.engine_max_loaded,
                        max_lora_rank=max(8, s.lora_rank),
                        target_modules=self.lora.target_modules, admin_token=token,
                        num_threads=s.engine_threads or None, dtype=s.dtype, device=s.device,
                    )
                    url, token = self._embedded.url, self._embedded.admin_token
                self._engine = EngineSampler.connect(url, self.base_path, token)
            return self._engine

    def close(self) -> None:
        """Stop what this context started (the embedded engine's server thread)."""
        if self._embedded is not None:
            self._embedded.stop()
            self._embedded = None

    @property
    def loaded_trainer(self) -> MultiPolicyTrainer | None:
        """The trainer if this process has made one (a rebalance must not load a model)."""
        return self._trainer

    @property
    def trainer(self) -> MultiPolicyTrainer:
        """All policies share one base and train in batched multi-policy steps."""
        with self._lock:
            if self._trainer is None:
                import torch

                from workers.training.multitrainer import MultiPolicyTrainer

                s = self.settings
                self._trainer = MultiPolicyTrainer(
                    self.base_path,
                    self.lora,
                    lr=s.learning_rate,
                    clip_eps=s.clip_eps,
                    kl_beta=s.kl_beta,
                    temperature=s.temperature,
                    seed=s.seed,
                    max_grad_norm_reject=s.max_grad_norm_reject,
                    dtype=getattr(torch, s.dtype),
                    device=s.device,
                )
            return self._trainer

    def adapter_for(self, policy_id: str, rev: RevisionPointer) -> str | None:
        """Make sure the engine holds this revision; return its serve name (None = base)."""
        if rev.is_base:
            return None
        name = serve_name(policy_id, rev.revision)
        if rev.sha256 is None:
            raise KeyError(f"revision {name} has no artifact")
        sha = rev.sha256
        self.engine.ensure_adapter(name, self._serving_path(sha),
                                   verify=lambda: self.store.verify(sha))
        return name

    def _serving_path(self, sha: str) -> Path:
        """The revision as the engine loads it: an external engine (SGLang) of a MoE base gets
        the per-expert layout (`workers.serving.sglang_layout`), derived once beside the store."""
        path = self.store.adapter_path(sha)
        if self.settings.engine_url is None:
            return path  # the embedded engine reads peft's layout
        from workers.models.registry import targets_for_base
        from workers.serving.sglang_layout import ensure_sglang_layout

        if not targets_for_base(self.base_path, self.lora.target_modules).needs_serving_layout:
            return path
        return ensure_sglang_layout(path, self.store.root / "sglang" / sha, self.base_path)
