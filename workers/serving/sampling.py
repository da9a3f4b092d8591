"""Sampling for the rollout and evaluate stages, through SGLang's HTTP API.

The stages never hold a model for sampling: they talk to an engine exactly as they would to an
SGLang server (`/load_lora_adapter`, `/generate` with `lora_path` and `return_logprob`). Point
`LORASTREAM_ENGINE_URL` at SGLang on a GPU host, or leave it unset and the worker embeds
lorastream's CPU engine, which serves the same API on a loopback port.
"""

from __future__ import annotations

import logging
import secrets
import threading
import urllib.error
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from schemas.errors import PoisonEventError, RetryableError
from workers.models.chat import end_ids, render_prompt
from workers.serving.client import Generation, SGLangClient, SGLangError, sample_params

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """One completion with the sampler's per-token log-probs (GRPO's `old` term)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool


@dataclass(frozen=True)
class SampleRequest:
    """One prompt to sample a group from (text, or the rendered ids `render` gives), its
    adapter (None = the base) and its own seed."""

    prompt: str | list[int]
    adapter: str | None
    seed: int | None = None


class Sampler(Protocol):
    """What the stages need from an engine: adapters by name, samples with log-probs."""

    def encode(self, prompt: str) -> list[int]: ...

    def render(self, prompt: str, messages: list[dict[str, str]] | None = None
               ) -> list[int]: ...

    def ensure_adapter(self, name: str, path: Path,
                       verify: Callable[[], bool] | None = None) -> None: ...

    def generate(self, prompts: Sequence[str | list[int]], adapter: str | None, *,
                 n: int, max_new_tokens: int, temperature: float = 1.0,
                 seed: int | None = None) -> list[list[Sample]]: ...


class EngineSampler:
    """`Sampler` over an `SGLangClient`: SGLang itself or lorastream's CPU engine.

    Given several engines (`engine_url` a comma-separated list) it uses one at a time and
    fails over to the next when the one in use stops answering: the failed call raises
    `RetryableError`, so the stage retries the unit, and its adapters are loaded again on the
    engine it moved to (an engine knows only the adapters it was told to load).

    Prompts go to the engine as token ids rendered here (`workers.models.chat`: the base's chat
    template when it has one), so rollout, training (which trains on the rollout's ids) and
    evaluation prompt the model the same way; every row stops on all the end ids the base
    declares (`stop_token_ids`)."""

    def __init__(self, client: SGLangClient, tokenizer: PreTrainedTokenizerBase,
                 standby: Sequence[SGLangClient] = (),
                 stop_ids: frozenset[int] = frozenset()) -> None:
        self.clients = [client, *standby]
        self.client = client
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids or end_ids(tokenizer)
        self._loaded: set[str] = set()
        self._lock = threading.RLock()

    @classmethod
    def connect(cls, url: str, base_path: Path, api_key: str | None = None) -> EngineSampler:
        clients = [SGLangClient(u.strip(), api_key=api_key) for u in url.split(",") if u.strip()]
        tokenizer = AutoTokenizer.from_pretrained(str(base_path))
        return cls(clients[0], tokenizer, clients[1:], end_ids(tokenizer, _Declared(base_path)))

    def _fail_over(self, failed: SGLangClient) -> None:
        """Move to the next engine (once per failure of the one in use)."""
        with self._lock:
            if self.client is not failed or len(self.clients) == 1:
                return
            self.client = self.clients[(self.clients.index(failed) + 1) % len(self.clients)]
            self._loaded.clear()

    def render(self, prompt: str, messages: list[dict[str, str]] | None = None) -> list[int]:
        """An interaction's prompt ids (chat template applied when the tokenizer has one);
        PoisonEventError for chat messages on a base without a template."""
        try:
            return render_prompt(self.tokenizer, prompt, messages)
        except ValueError as exc:
            raise PoisonEventError(str(exc)) from exc

    def encode(self, prompt: str) -> list[int]:
        """A text prompt's ids as the stages send them (`render` of one user turn)."""
        return self.render(prompt)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return prompt if isinstance(prompt, list) else self.render(prompt)

    def ensure_adapter(self, name: str, path: Path,
                       verify: Callable[[], bool] | None = None) -> None:
        """Load once per name; serve names are immutable, so a loaded name is never stale.
        `verify` (the artifact's sha256 check) runs before a load: a corrupt file never loads."""
        with self._lock:
            if name in self._loaded:
                return
            if verify is not None and not verify():
                raise PoisonEventError(f"adapter {name} at {path} failed its sha256 check")
            try:
                self._call(self.client.load_lora_adapter, name, str(path))
            except SGLangError as exc:
                if "already" not in exc.message:
                    raise
            self._loaded.add(name)

    def generate(self, prompts: Sequence[str | list[int]], adapter: str | None, *,
                 n: int, max_new_tokens: int, temperature: float = 1.0,
                 seed: int | None = None) -> list[list[Sample]]:
        ids = [self._ids(p) for p in prompts]
        groups = self._call(self.client.sample, ids, adapter, n=n,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            stop_token_ids=sorted(self.stop_ids))
        return [[_sample(g) for g in group] for group in groups]

    def generate_many(self, requests: Sequence[SampleRequest], *, n: int, max_new_tokens: int,
                      temperature: float = 1.0) -> list[list[Sample]]:
        """n samples of every request, each with its own adapter and seed, in ONE /generate.

        Rows name their adapter one by one (`lora_path` per row), so the engine batches the
        rows of different policies into shared forwards (SGLang's multi-LoRA batching, and the
        CPU engine's slots): k policies cost one request and one queue wait, not k. A request's
        rows get exactly the seeds `generate([prompt], adapter, n=n, seed=seed)` gives them, so
        its samples do not depend on its batch-mates (up to the float rounding of a differently
        shaped batch). Groups come back in the order of `requests`.
        """
        if not requests:
            return []
        rows: list[list[int]] = []
        adapters: list[str | None] = []
        params: list[dict[str, Any]] = []
        for r in requests:
            rows += [self._ids(r.prompt)] * n
            adapters += [r.adapter] * n
            params += sample_params(1, n, max_new_tokens=max_new_tokens,
                                    temperature=temperature, seed=r.seed,
                                    stop_token_ids=sorted(self.stop_ids))
        out = self._call(self.client.generate, rows, lora_path=adapters, sampling_params=params)
        if len(out) != len(rows):
            raise RuntimeError(f"engine answered {len(out)} rows for {len(rows)} requested")
        return [[_sample(g) for g in out[k * n:(k + 1) * n]] for k in range(len(requests))]

    def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Transport failures are transient (engine restarting, or gone: the next engine is
        tried on the retry); refusals are not."""
        client = getattr(fn, "__self__", self.client)
        try:
            return fn(*args, **kwargs)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            self._fail_over(client)
            raise RetryableError(f"engine unreachable: {exc}") from exc


class _Declared:
    """The end ids a base directory declares in its config and generation config."""

    def __init__(self, base_path: Path) -> None:
        self.config = AutoConfig.from_pretrained(str(base_path))
        try:
            self.generation_config: GenerationConfig | None = GenerationConfig.from_pretrained(
                str(base_path))
        except OSError:  # no generation_config.json: the config's ids are all there is
            self.generation_config = None


def _sample(g: Generation) -> Sample:
    if len(g.token_ids) != len(g.logprobs):
        raise RuntimeError(
            f"engine returned {len(g.token_ids)} tokens but {len(g.logprobs)} log-probs"
        )
    return Sample(text=g.text, token_ids=g.token_ids, logprobs=g.logprobs, finished=g.finished)


class EmbeddedEngine:
    """lorastream's CPU engine on a loopback port inside this process (no engine URL set).

    Its load/unload endpoints always require a token: the configured one, else a random one
    only this process knows, since any local process can reach a loopback port.
    """

    def __init__(self, base_path: Path, *, max_loaded_loras: int, max_lora_rank: int,
                 target_modules: Sequence[str], admin_token: str | None = None,
                 num_threads: int | None = None, dtype: str = "float32",
                 device: str = "cpu") -> None:
        from workers.serving.cpu_engine import CpuEngine, EngineConfig
        from workers.serving.server import ServerThread

        config = EngineConfig(base_path=base_path, max_loaded_loras=max_loaded_loras,
                              max_lora_rank=max_lora_rank,
                              lora_target_modules=tuple(target_modules),
                              num_threads=num_threads, dtype=dtype, device=device)
        self.admin_token = admin_token or secrets.token_urlsafe(32)
        self.server = ServerThread(CpuEngine(config), admin_token=self.admin_token).start()
        log.info("embedded CPU engine serving SGLang's API at %s", self.server.url)

    @property
    def url(self) -> str:
        return self.server.url

    def stop(self) -> None:
        self.server.stop()
