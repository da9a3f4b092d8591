"""Content-addressed artifact store for adapter-only revisions, local or shared by URL.

A revision's id is the sha256 of its safetensors bytes, so the same weights always get the same
id, an export retried after a crash is a no-op, and a reader can verify what it loads.
Directories appear by rename only, so a revision is visible only once complete.

An export is on the handoff's critical path (trainer -> serving), so it is built for latency:
the file is written straight from the tensors' memory with one `writev` (the bytes
`safetensors.torch.save` gives, without its per-tensor ctypes/numpy round trips and its joined
copy), and the sha256 runs on a second thread while the same buffers are written and fsynced
under a temporary name (hashlib and the write syscalls release the GIL). Durability is
unchanged: both files and both directories are fsynced before and after the rename.

With a shared copy (`LORASTREAM_ARTIFACT_URL`: an object store or a shared filesystem,
`workers/artifacts/remote.py`) the local root is a cache: what is written here is also put
there (weights first, the config last: its presence marks a complete revision), and a revision
missing here is fetched, hashed, and enters the cache only if it hashes to its address.
torch and safetensors are imported where tensors are handled, so naming the store stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from infra.settings import Settings
from schemas.errors import PoisonEventError
from workers.artifacts.remote import RemoteFiles
from workers.models.base import LoraSpec
from workers.pipeline import faults

if TYPE_CHECKING:
    import torch

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_POLICY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_METADATA = {"format": "pt"}
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.:/-]+$")
"""Keys JSON encodes the same way in Python and in safetensors' serde (nothing to escape)."""


class ArtifactCorrupt(RuntimeError):
    """Fetched bytes do not hash to the address they were asked for: never cached or loaded."""


@dataclass(frozen=True)
class ArtifactRef:
    sha256: str
    path: Path
    size_bytes: int


def adapter_config(lora: LoraSpec, base_model: str) -> dict[str, Any]:
    """The adapter_config.json PEFT (and vLLM/SGLang) need to load an adapter-only revision:
    targets resolved by the architecture registry for the base at `base_model` (MoE families
    get peft#3711-safe `target_parameters`); a name that is no local base directory gets the
    Llama-shaped leaves of the target groups."""
    from workers.models import registry

    if Path(base_model).is_dir():
        targets = registry.targets_for_base(base_model, lora.target_modules)
        return registry.adapter_config(lora.rank, lora.alpha, base_model, targets)
    leaves = {"attn": registry.GQA, "mlp": registry.SWIGLU}
    modules = [m for t in registry.parse_targets(lora.target_modules)
               for m in leaves.get(t, () if t in registry.GROUPS else (t,))]
    return registry.lora_config(lora.rank, lora.alpha, base_model, {"target_modules": modules})


def safetensors_parts(tensors: dict[str, torch.Tensor]) -> list[memoryview]:
    """The file as buffers in write order: the header, then each tensor's own memory (float32,
    sorted keys, fixed metadata). Joined, byte for byte what `safetensors.torch.save` writes (a
    test holds it to that), without building the joined copy: the export hashes and `writev`s
    the parts."""
    import safetensors.torch
    import torch

    ordered = [(k, tensors[k].detach().to("cpu", torch.float32).contiguous())
               for k in sorted(tensors)]
    if not ordered or not all(_PLAIN_KEY.fullmatch(k) for k, _ in ordered):
        return [memoryview(safetensors.torch.save(dict(ordered), metadata=_METADATA))]
    header: dict[str, Any] = {"__metadata__": _METADATA}
    offset = 0
    for key, t in ordered:  # one dtype: safetensors orders by name alone
        size = 4 * t.numel()
        header[key] = {"dtype": "F32", "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes with spaces
    head = memoryview(len(text).to_bytes(8, "little") + text)
    return [head, *(t.numpy().data.cast("B") for _, t in ordered)]


def serialize_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Deterministic safetensors bytes of `tensors` (see `safetensors_parts`)."""
    return b"".join(safetensors_parts(tensors))


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames into it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, parts: Sequence[bytes | memoryview]) -> None:
    """Write `parts` in order (one `writev` unless the kernel writes short), then fsync."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = os.writev(fd, parts) if parts else 0
        for part in parts:  # only after a short writev: finish what it left
            view = memoryview(part).cast("B")
            skip = min(written, len(view))
            written -= skip
            view = view[skip:]
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_in_background(parts: Sequence[memoryview]) -> Callable[[], str]:
    """Start hashing `parts` on another thread; the returned call joins and gives the hex."""
    out: list[str] = []

    def digest() -> None:
        sha = hashlib.sha256()
        for part in parts:
            sha.update(part)
        out.append(sha.hexdigest())

    thread = threading.Thread(target=digest, name="artifact-sha256", daemon=True)
    thread.start()

    def result() -> str:
        thread.join()
        if not out:
            raise RuntimeError("hashing the adapter failed")
        return out[0]

    return result


class ArtifactStore:
    """root/adapters/<sha256>/{adapter_model.safetensors, adapter_config.json}, root/staging/;
    the same keys under `remote` when there is a shared copy."""

    def __init__(self, root: Path, remote: RemoteFiles | None = None) -> None:
        self.root = Path(root)
        self.remote = remote
        if remote is not None:
            remote.ensure()
        self.adapters = self.root / "adapters"
        self.staging = self.root / "staging"
        self._tmp = self.root / "tmp"
        for d in (self.adapters, self.staging, self._tmp):
            d.mkdir(parents=True, exist_ok=True)

    @classmethod
    def for_settings(cls, settings: Settings) -> ArtifactStore:
        """The process's store: `settings.artifacts` alone, or as the cache of
        `settings.artifact_url`."""
        return cls(settings.artifacts, RemoteFiles.from_settings(settings))

    def put_adapter(self, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> ArtifactRef:
        """Write a revision once; the same tensors give the same ref and no rewrite.

        The id covers the weights only: the config of the first write of those weights wins.
        The weights are written under a temporary name while they are hashed (a rewrite of
        existing weights is then thrown away: rare, it only happens on retries).
        """
        parts = safetensors_parts(tensors)
        sha256 = _sha256_in_background(parts)
        tmp = Path(tempfile.mkdtemp(prefix="put.", dir=self._tmp))
        try:
            _write_synced(tmp / WEIGHTS_FILE, parts)
            _write_synced(tmp / CONFIG_FILE,
                          [json.dumps(config, indent=2, sort_keys=True).encode()])
            sha = sha256()
            final = self.adapters / sha
            if not (final / CONFIG_FILE).is_file():
                self._publish(tmp, final)
        finally:
            sha256()  # never leave the hashing thread reading a buffer being freed
            shutil.rmtree(tmp, ignore_errors=True)
        self._share_adapter(sha, final)
        return ArtifactRef(sha256=sha, path=final, size_bytes=sum(len(p) for p in parts))

    def _share_adapter(self, sha: str, local: Path) -> None:
        """Put a revision in the shared copy (again after a crash between the two copies)."""
        if self.remote is None or self.remote.exists(f"adapters/{sha}/{CONFIG_FILE}"):
            return
        self.remote.put(local / WEIGHTS_FILE, f"adapters/{sha}/{WEIGHTS_FILE}")
        self.remote.put(local / CONFIG_FILE, f"adapters/{sha}/{CONFIG_FILE}")

    def location(self, path: Path) -> str:
        """Where another host finds a file of this store: its URL in the shared copy, else
        the local path."""
        if self.remote is None:
            return str(path)
        return self.remote.url(Path(path).resolve().relative_to(self.root.resolve()).as_posix())

    def _publish(self, tmp: Path, final: Path) -> None:
        """Make a complete, fsynced temporary dir the revision's dir, by rename only."""
        fsync_path(tmp)
        faults.hit("artifact:before_rename")  # test-only crash window
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / CONFIG_FILE).is_file():  # not a lost race: a real error
                raise
        fsync_path(self.adapters)

    def adapter_path(self, sha256: str) -> Path:
        """The revision's PEFT dir in the local cache, fetched from the shared copy when it is
        not there yet; a malformed id is refused before it touches any storage."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise PoisonEventError(f"not a sha256 hex digest: {sha256!r}")
        path = self.adapters / sha256
        if not ((path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()):
            if self.remote is None:
                raise FileNotFoundError(f"no adapter {sha256} in {self.adapters}")
            self._fetch_adapter(sha256, path)
        return path

    def _fetch_adapter(self, sha256: str, final: Path) -> None:
        """Download a revision into the cache; it enters only if its weights hash to its id."""
        assert self.remote is not None
        tmp = Path(tempfile.mkdtemp(prefix="get.", dir=self._tmp))
        try:
            try:
                self.remote.get(f"adapters/{sha256}/{CONFIG_FILE}", tmp / CONFIG_FILE)
                self.remote.get(f"adapters/{sha256}/{WEIGHTS_FILE}", tmp / WEIGHTS_FILE)
            except FileNotFoundError as exc:
                raise FileNotFoundError(f"no adapter {sha256} in {self.remote.base_url}") from exc
            got = _sha256_file(tmp / WEIGHTS_FILE)
            if got != sha256:
                raise ArtifactCorrupt(f"adapter {sha256} from {self.remote.base_url} hashes "
                                      f"to {got}")
            self._publish(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def verify(self, sha256: str) -> bool:
        """True only if the cached weights (fetched when missing) hash to their id (missing or
        unreadable in the shared copy -> False)."""
        try:
            path = self.adapter_path(sha256)
        except (FileNotFoundError, ArtifactCorrupt):
            return False
        return _sha256_file(path / WEIGHTS_FILE) == sha256

    def stage(self, policy_id: str, step: int, tensors: dict[str, torch.Tensor],
              tag: str = "") -> Path:
        """Trainer -> exporter handoff: staging/<policy>/<step>[-<tag>].safetensors,
        atomically."""
        if not _POLICY.fullmatch(policy_id):
            raise PoisonEventError(f"invalid policy id {policy_id!r}")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise PoisonEventError(f"invalid step {step!r}")
        if tag and not _POLICY.fullmatch(tag):
            raise PoisonEventError(f"invalid tag {tag!r}")
        directory = self.staging / policy_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{step}{'-' + tag if tag else ''}.safetensors"
        fd, name = tempfile.mkstemp(prefix=f".{step}.", suffix=".tmp", dir=directory)
        os.close(fd)
        tmp = Path(name)
        try:
            _write_synced(tmp, safetensors_parts(tensors))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_path(directory)
        if self.remote is not None:
            self.remote.put(path, f"staging/{policy_id}/{path.name}")
        return path

    def discard_staged(self, location: str) -> None:
        """Remove a staged checkpoint no step will ever name (its step was fenced off)."""
        key = self.remote.key_of(location) if self.remote is not None else None
        path = self.root / key if key is not None else Path(location)
        if path.resolve().is_relative_to(self.staging.resolve()):
            path.unlink(missing_ok=True)
        if key is not None and self.remote is not None:
            self.remote.delete(key)

    def load_tensors(self, path: Path) -> dict[str, torch.Tensor]:
        import safetensors.torch

        return safetensors.torch.load_file(str(path), device="cpu")

    def load_staged(self, location: str) -> dict[str, torch.Tensor]:
        """A staged checkpoint by the location an update named (`location`): a local path
        inside this store, or a URL of its shared copy (fetched into the cache)."""
        key = self.remote.key_of(location) if self.remote is not None else None
        if key is not None:
            path = self.root / key
            if not path.is_file():
                assert self.remote is not None
                self.remote.get(key, path)
        else:
            path = Path(location)
            if not path.resolve().is_relative_to(self.root.resolve()):
                raise PoisonEventError(f"staged checkpoint {location} is outside the artifact "
                                       "store")
        return self.load_tensors(path)

    def total_size(self) -> int:
        """Bytes held by all revisions (for retention metrics)."""
        return sum(p.stat().st_size for p in self.adapters.glob("*/*") if p.is_file())
