"""The CPU engine's adapter registry: SGLang's capacity semantics, without any torch.

What it mirrors (SGLang's `--max-loaded-loras` / `--max-loras-per-batch` flags,
`srt/lora/lora_registry.py`, and `TokenizerManager._resolve_lora_path`):
- `max_loaded_loras` caps registered adapters; a load registers first, then evicts the least
  recently used unpinned adapters until the registry is back under the cap (so one spare slot
  exists for the incoming adapter), failing when nothing can be evicted;
- pinned adapters are never evicted and at most `max_loras_per_batch - 1` may be pinned;
- lookups count as uses (LRU order); each request holds its adapter (in-flight counter), and an
  unload waits until that count is zero, so in-flight requests finish on the old weights;
- a name loaded once is remembered (`ref_cache`): a request naming it after eviction or unload
  reloads it implicitly. This is why deny decisions belong in the router, not in unload.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field


class RegistryError(ValueError):
    """A load/unload/lookup that SGLang would answer with success=false or a 400."""


@dataclass
class AdapterRef:
    name: str
    path: str
    pinned: bool
    slot: int
    lora_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    in_flight: int = 0
    released: asyncio.Event = field(default_factory=asyncio.Event)


class AdapterRegistry:
    """Name -> slot bookkeeping, LRU order, pins, in-flight counts. Event-loop confined."""

    def __init__(self, max_loaded_loras: int, max_loras_per_batch: int) -> None:
        if max_loras_per_batch < 1 or max_loaded_loras < max_loras_per_batch:
            raise ValueError("need 1 <= max_loras_per_batch <= max_loaded_loras")
        self.max_loaded = max_loaded_loras
        self.max_per_batch = max_loras_per_batch
        self.num_slots = max_loaded_loras + 1  # the spare a load fills before evicting
        self._free = list(range(self.num_slots))
        self._loaded: OrderedDict[str, AdapterRef] = OrderedDict()
        self.ref_cache: dict[str, tuple[str, bool]] = {}

    # -- queries ---------------------------------------------------------------------------
    def loaded_adapters(self) -> dict[str, str]:
        """SGLang's `loaded_adapters`: {name: path} of everything registered now."""
        return {name: ref.path for name, ref in self._loaded.items()}

    def get(self, name: str) -> AdapterRef | None:
        return self._loaded.get(name)

    def pinned_count(self) -> int:
        return sum(ref.pinned for ref in self._loaded.values())

    # -- load / unload ---------------------------------------------------------------------
    def check_new(self, name: str, pinned: bool) -> None:
        if name in self._loaded:
            raise RegistryError(f"The LoRA adapter {name!r} is already loaded. Unload it "
                                "first or load the new revision under a new name.")
        if pinned and self.pinned_count() >= self.max_per_batch - 1:
            raise RegistryError(f"Cannot pin {name!r}: at most max_loras_per_batch - 1 = "
                                f"{self.max_per_batch - 1} adapters may be pinned")
        if not self._free:
            raise RegistryError("no free adapter slot (an earlier eviction did not finish)")

    def reserve_slot(self) -> int:
        return self._free.pop(0)

    def release_slot(self, slot: int) -> None:
        self._free.append(slot)

    def register(self, name: str, path: str, pinned: bool, slot: int) -> AdapterRef:
        ref = AdapterRef(name=name, path=path, pinned=pinned, slot=slot)
        ref.released.set()
        self._loaded[name] = ref
        self.ref_cache[name] = (path, pinned)
        return ref

    def lru_victims(self) -> list[str]:
        """Names to evict (LRU first, pinned skipped) to get back to max_loaded_loras."""
        excess = len(self._loaded) - self.max_loaded
        if excess <= 0:
            return []
        # Idle adapters first: evicting one a waiting request already holds would stall it.
        unpinned = [(ref.in_flight > 0, n) for n, ref in self._loaded.items() if not ref.pinned]
        victims = [n for _, n in sorted(unpinned, key=lambda v: v[0])][:excess]
        if len(victims) < excess:
            raise RegistryError("Didn't find any LoRA adapters when trying to evict LRU LoRA "
                                f"adapter. LoRA registry is: {list(self._loaded)}")
        return victims

    def unregister(self, name: str) -> AdapterRef:
        """Stop new requests from resolving `name`; the caller waits for `released`."""
        ref = self._loaded.pop(name, None)
        if ref is None:
            raise RegistryError(f"LoRA adapter {name!r} is not loaded. "
                                f"Loaded adapters: {list(self._loaded)}")
        return ref

    # -- request path ----------------------------------------------------------------------
    def check_request(self, names: list[str | None]) -> list[str]:
        """Distinct adapter names of a request; unknown names fail like SGLang's resolver."""
        distinct = list(dict.fromkeys(n for n in names if n is not None))
        if len(distinct) > self.max_loaded:
            raise RegistryError(f"Received request with {len(distinct)} unique loras requested "
                                f"but max loaded loras is {self.max_loaded}")
        for name in distinct:
            if name not in self._loaded and name not in self.ref_cache:
                raise RegistryError(f"Got LoRA adapter that has never been loaded: {name}\n"
                                    f"All loaded adapters: {list(self._loaded)}")
        return distinct

    def acquire(self, name: str) -> AdapterRef:
        ref = self._loaded[name]
        self._loaded.move_to_end(name)
        ref.in_flight += 1
        ref.released.clear()
        return ref

    def release(self, ref: AdapterRef) -> None:
        ref.in_flight -= 1
        if ref.in_flight <= 0:
            ref.released.set()
