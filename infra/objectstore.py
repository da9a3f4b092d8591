"""A real S3-compatible server on this machine: SeaweedFS's `weed`, built from the Go module
proxy once and kept under the data directory.

The artifact store's object-store path (`workers/artifacts/remote.py`) is tested against a real
server, not a mock, and `lorastream infra s3 up` gives a developer the same server to point
several local workers and engines at. `go install pkg@version` refuses SeaweedFS's module (its
go.mod has a `replace` directive), so the module is downloaded and built inside the module cache
(about 5 minutes on 2 cores, a ~230 MB binary); later starts take a second or two. Every port is
on loopback; without an identity config the server accepts anonymous requests.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra.process import Echo, ServiceError, read_pid, stderr, stop_pid, tail
from infra.settings import Settings

MODULE = "github.com/seaweedfs/seaweedfs"
VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
MARKER = "weed"


def weed_path(settings: Settings) -> Path:
    """Where the built binary lives (`LORASTREAM_WEED` or `weed` on PATH win when set)."""
    env = os.environ.get("LORASTREAM_WEED")
    if env:
        return Path(env)
    return settings.data_dir / "seaweedfs" / "weed"


def find_weed(settings: Settings) -> Path | None:
    """The `weed` binary if it is here already (nothing is built)."""
    built = weed_path(settings)
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which("weed")
    return Path(found) if found else None


def build_weed(settings: Settings, echo: Echo = stderr, timeout_s: float = 1800.0) -> Path:
    """Build `weed` at the pinned version once; later calls return the binary at once."""
    found = find_weed(settings)
    if found is not None:
        return found
    go = shutil.which("go") or ("/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").is_file()
                                else None)
    if go is None:
        raise ServiceError("go not found: the S3 test server (SeaweedFS) is built with Go 1.26+")
    dest = weed_path(settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    echo(f"seaweedfs: building weed {VERSION} into {dest} (first run only, ~5 min) ...")
    env = {**os.environ, "GOFLAGS": "-mod=mod"}
    _run([go, "mod", "download", f"{MODULE}@{VERSION}"], env, timeout_s, cwd=dest.parent)
    cache = subprocess.run([go, "env", "GOMODCACHE"], capture_output=True, text=True,
                           check=True).stdout.strip()
    tmp = dest.with_name(".weed.building")
    _run([go, "build", "-o", str(tmp), "./weed"], env, timeout_s,
         cwd=Path(cache) / f"{MODULE}@{VERSION}")
    os.replace(tmp, dest)
    return dest


def _run(cmd: list[str], env: dict[str, str], timeout_s: float, cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    if done.returncode != 0:
        raise ServiceError(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-3000:]}")


def _free_port_pair(lo: int = 20000, hi: int = 40000) -> int:
    """A port p with p + 10000 free too (SeaweedFS puts each gRPC port 10000 above)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = int(s.getsockname()[1])
        if not lo <= p < hi:
            continue
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        return p
    raise ServiceError("no free loopback ports for SeaweedFS")


@dataclass
class S3Server:
    """One all-in-one `weed server` (master, volume, filer, S3) on loopback."""

    binary: Path
    root: Path
    s3_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    @property
    def pid_file(self) -> Path:
        return self.root / "weed.pid"

    @property
    def log(self) -> Path:
        return self.root / "weed.log"

    def start(self, timeout_s: float = 90.0) -> S3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "data").mkdir(exist_ok=True)
        ports = [_free_port_pair() for _ in range(3)]
        self.s3_port = self.s3_port or _free_port_pair()
        cmd = [str(self.binary), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-master.port={ports[0]}", f"-volume.port={ports[1]}",
               f"-filer.port={ports[2]}", "-s3", f"-s3.port={self.s3_port}",
               "-volume.max=0", "-master.volumeSizeLimitMB=64"]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pid_file.write_text(f"{self.proc.pid}\n")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if self._answers():
                return self
            time.sleep(0.3)
        self.stop()
        raise ServiceError(f"SeaweedFS S3 did not answer on {self.endpoint}:\n{tail(self.log)}")

    def _answers(self) -> bool:
        """The S3 API lists buckets, and a volume is ready to take a write."""
        try:
            with urllib.request.urlopen(self.endpoint + "/", timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def create_bucket(self, name: str, timeout_s: float = 60.0) -> None:
        """PUT /<bucket>, retried while the volume servers are still coming up."""
        deadline = time.monotonic() + timeout_s
        while True:
            req = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
            try:
                with urllib.request.urlopen(req, timeout=10):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code == 409:  # exists already
                    return
                if time.monotonic() > deadline:
                    raise
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.5)

    def stop(self) -> None:
        pid = self.proc.pid if self.proc is not None else read_pid(self.pid_file, MARKER)
        if pid is not None:
            stop_pid(pid, 5)  # a test server: nothing to flush that matters
        if self.proc is not None:
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.pid_file.unlink(missing_ok=True)


def s3_settings(settings: Settings, server: S3Server, bucket: str, prefix: str = "") -> Settings:
    """`settings` with the artifact store's shared copy in `bucket` on `server`."""
    url = f"s3://{bucket}" + (f"/{prefix.strip('/')}" if prefix else "")
    return settings.model_copy(update={"artifact_url": url,
                                       "s3_endpoint_url": server.endpoint})


def main() -> int:
    """`python -m infra.objectstore`: build `weed` if it is not there (infra/dev.sh runs it)."""
    try:
        print(build_weed(Settings()))
    except ServiceError as exc:
        print(f"error: {exc}", file=__import__("sys").stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
