"""API keys per namespace: a key sees only its namespace's policies.

A key is `lsk-<key id>-<secret>` (the id is public, e.g. in `lorastream keys list`; 32 random
bytes of secret). Redis stores only its sha256 (`apikey:<sha256>` -> key id and namespace, the
one lookup a request pays) and metadata per key id (`apikeys`); a plain hash suffices because
the secret is random and long, not a password. Revoking deletes both.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import asdict, dataclass
from typing import cast

import orjson
import redis

from infra.settings import Settings
from workers.keys import RedisKeys

PREFIX = "lsk-"
NAMESPACE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    namespace: str
    name: str = ""
    created: float = 0.0


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class ApiKeys:
    """Create, list, revoke and check keys (one Redis round trip per check)."""

    def __init__(self, settings: Settings, client: redis.Redis | None = None) -> None:
        self.r = client or redis.Redis.from_url(settings.redis_url)
        self.keys = RedisKeys(settings)

    def create(self, namespace: str, name: str = "") -> tuple[str, ApiKey]:
        """A new key for `namespace`; the secret is returned here and never stored."""
        if not NAMESPACE.match(namespace):
            raise ValueError(f"invalid namespace {namespace!r}")
        key_id = secrets.token_hex(6)
        secret = f"{PREFIX}{key_id}-{secrets.token_urlsafe(32)}"
        key = ApiKey(key_id, namespace, name, time.time())
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(self.keys.api_keys(), key_id,
                  orjson.dumps({**asdict(key), "sha256": digest(secret)}))
        pipe.set(self.keys.api_key(digest(secret)), orjson.dumps(asdict(key)))
        pipe.execute()
        return secret, key

    def list(self, namespace: str | None = None) -> list[ApiKey]:
        raw = cast("dict[bytes, bytes]", self.r.hgetall(self.keys.api_keys()))
        out = []
        for value in raw.values():
            data = orjson.loads(value)
            data.pop("sha256", None)
            if namespace is None or data["namespace"] == namespace:
                out.append(ApiKey(**data))
        return sorted(out, key=lambda k: (k.namespace, k.created))

    def revoke(self, key_id: str) -> bool:
        raw = cast("bytes | None", self.r.hget(self.keys.api_keys(), key_id))
        if raw is None:
            return False
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(self.keys.api_key(orjson.loads(raw)["sha256"]))
        pipe.hdel(self.keys.api_keys(), key_id)
        pipe.execute()
        return True

    def check(self, secret: str) -> ApiKey | None:
        """The key a bearer secret is, or None (unknown, revoked or malformed)."""
        if not secret.startswith(PREFIX) or len(secret) > 200:
            return None
        raw = cast("bytes | None", self.r.get(self.keys.api_key(digest(secret))))
        return ApiKey(**orjson.loads(raw)) if raw is not None else None
