"""The CPU engine's core: adapter registry + slot sampler + a batcher, behind async methods.

The HTTP layer (`server.py`) only parses and formats; everything with semantics lives here, so
tests and benchmarks can drive the engine in-process too. One asyncio loop owns the registry;
all model work runs in ONE thread, the model thread, from loading the base onwards.

Why one thread, loading included: OpenMP (libgomp, which torch's CPU wheels use) gives every
thread that runs parallel torch ops its own team of worker threads, and once the process holds
more of those than it has CPUs, libgomp throttles every barrier's spin-wait to ~100 spins and
sleeps on a futex instead. A forward of a few tokens runs hundreds of parallel regions, so it
then pays a futex wake-up for each: a forward is measurably slower once the model was loaded (or
anything parallel ran) in another thread, as `asyncio.to_thread` or a two-worker pool did before
(docs/performance.md, "Inside the CPU engine").

Batching: requests queue up while a batch runs; the next batch takes, in arrival order, every
waiting row whose adapter fits within `max_loras_per_batch` distinct adapters (the base model
counts as one, as in SGLang), so concurrent requests for different adapters share each forward.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from workers.models.base import LoraSpec
from workers.serving.registry import AdapterRef, AdapterRegistry, RegistryError
from workers.serving.sampler import RowRequest, RowResult, SlotSampler

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EngineConfig:
    """SGLang's flags that matter here, with the same names and meaning."""

    base_path: Path
    max_loaded_loras: int = 8
    max_loras_per_batch: int = 4
    max_lora_rank: int = 8
    lora_target_modules: tuple[str, ...] = LoraSpec().target_modules
    max_running_requests: int = 64
    served_model_name: str | None = None
    dtype: str = "float32"
    """`float32` or `bfloat16` (SGLang's `--dtype`) for the base; LoRA slots stay float32."""
    num_threads: int | None = None
    """Intra-op threads of the engine's model work (None: torch's default, one per core).

    Set by the sampler in the engine's worker threads on each call (OpenMP's and MKL's counts
    are per thread), so the caller's threads keep theirs; torch's process-wide default (what
    threads that never set a count start from) becomes this value too. On a CPU shared with
    other jobs, 1 avoids OpenMP barriers waiting on a descheduled sibling: a forward of a few
    tokens is ~200 oneDNN matmuls, each a barrier with 2 threads. LoRA deltas always run on
    one thread (`slot_linear`)."""


@dataclass
class _Pending:
    row: RowRequest
    adapter: str | None
    ref: AdapterRef | None
    future: asyncio.Future[RowResult] = field(repr=False)


def update_output(success: bool, error: str, loaded: dict[str, str] | None) -> dict[str, Any]:
    """SGLang's LoRAUpdateOutput (with BaseReq's rid/http_worker_ipc) as the body to send."""
    return {"rid": None, "http_worker_ipc": None, "success": success,
            "error_message": error, "loaded_adapters": loaded}


class CpuEngine:
    """SGLang's LoRA serving semantics over transformers on the CPU."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.registry = AdapterRegistry(config.max_loaded_loras, config.max_loras_per_batch)
        # The model thread: the only thread that ever runs this engine's torch work.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cpu-engine-model")
        try:
            self.sampler = self._executor.submit(
                SlotSampler, config.base_path, num_slots=self.registry.num_slots,
                max_rank=config.max_lora_rank, target_modules=config.lora_target_modules,
                dtype=_DTYPES[config.dtype], num_threads=config.num_threads).result()
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        self.model_name = config.served_model_name or str(config.base_path)
        self._update_lock: asyncio.Lock | None = None
        self._pending: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.max_adapters_in_a_batch = 0

    async def start(self) -> None:
        self._update_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._batch_loop(), name="cpu-engine-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- adapters ----------------------------------------------------------------------------
    async def load_lora_adapter(self, name: str, path: str, pinned: bool = False
                                ) -> dict[str, Any]:
        assert self._update_lock is not None, "start() the engine first"
        async with self._update_lock:
            try:
                await self._load_locked(name, path, pinned)
            except (RegistryError, OSError, ValueError) as exc:
                return update_output(False, str(exc), None)
            return update_output(True, "", self.registry.loaded_adapters())

    async def _load_locked(self, name: str, path: str, pinned: bool) -> None:
        if not name:
            raise RegistryError("lora_name must be a non-empty string")
        if not Path(path).is_dir():
            raise RegistryError(f"lora_path {path!r} is not a local adapter directory")
        self.registry.check_new(name, pinned)
        slot = self.registry.reserve_slot()
        try:
            await self._run(self.sampler.load, slot, Path(path))
        except BaseException:
            self.registry.release_slot(slot)
            raise
        self.registry.register(name, path, pinned, slot)
        for victim in self.registry.lru_victims():
            log.info("evicting least recently used adapter %s", victim)
            await self._unload_locked(victim)

    async def unload_lora_adapter(self, name: str) -> dict[str, Any]:
        assert self._update_lock is not None, "start() the engine first"
        async with self._update_lock:
            try:
                await self._unload_locked(name)
            except RegistryError as exc:
                return update_output(False, str(exc), None)
            return update_output(True, "", self.registry.loaded_adapters())

    async def _unload_locked(self, name: str) -> None:
        """Drain-safe: unregister, wait for in-flight requests, then free the slot."""
        ref = self.registry.unregister(name)
        await ref.released.wait()
        await self._run(self.sampler.clear, ref.slot)
        self.registry.release_slot(ref.slot)

    async def _ensure_loaded(self, name: str) -> None:
        """Implicit reload of a name loaded before (SGLang's lora_ref_cache behaviour)."""
        if self.registry.get(name) is not None:
            return
        assert self._update_lock is not None
        async with self._update_lock:
            if self.registry.get(name) is None:
                path, pinned = self.registry.ref_cache[name]
                log.info("Reloading evicted adapter: %s", name)
                await self._load_locked(name, path, pinned)

    # -- generation --------------------------------------------------------------------------
    async def generate(self, rows: list[RowRequest], adapters: list[str | None]
                       ) -> list[RowResult]:
        """Sample every row with its adapter; raises RegistryError for unknown adapters."""
        assert self._wakeup is not None, "start() the engine first"
        for name in self.registry.check_request(adapters):
            await self._ensure_loaded(name)
        loop = asyncio.get_running_loop()
        items = []
        for row, adapter in zip(rows, adapters, strict=True):
            ref = self.registry.acquire(adapter) if adapter is not None else None
            items.append(_Pending(row, adapter, ref, loop.create_future()))
        try:
            self._pending.extend(items)
            self._wakeup.set()
            return list(await asyncio.gather(*(i.future for i in items)))
        finally:
            for item in items:
                if item.ref is not None:
                    self.registry.release(item.ref)

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        adapters: set[str | None] = set()
        keep: deque[_Pending] = deque()
        while self._pending:
            item = self._pending.popleft()
            fits = item.adapter in adapters or len(adapters) < self.config.max_loras_per_batch
            if fits and len(batch) < self.config.max_running_requests:
                adapters.add(item.adapter)
                batch.append(item)
            else:
                keep.append(item)
        self._pending = keep
        self.max_adapters_in_a_batch = max(self.max_adapters_in_a_batch, len(adapters))
        return batch

    async def _batch_loop(self) -> None:
        assert self._wakeup is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = [i for i in self._take_batch() if not i.future.done()]
            if not batch:
                continue
            rows = [RowRequest(**{**i.row.__dict__, "slot": i.ref.slot if i.ref else None})
                    for i in batch]
            started = time.perf_counter()
            try:
                results = await self._run(self.sampler.generate, rows)
            except Exception as exc:  # a model error fails this batch, not the server
                log.exception("batch of %d rows failed", len(rows))
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.batches += 1
            log.debug("batch of %d rows in %.3f s", len(rows), time.perf_counter() - started)
            for item, result in zip(batch, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result)
