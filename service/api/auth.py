"""API keys: who may call what, and how often.

A keys file (``NEUROSERVE_API_KEYS_FILE``) is a JSON list of ``{"name", "sha256", "scopes",
"requests_per_minute"}``: only each key's SHA-256 is stored, a presented key is hashed and compared
with every stored hash in constant time, and no key is ever logged. Scopes: ``infer`` (inference
and model metadata), ``metrics`` (``/metrics``), ``admin`` (the repository index, the model list, loading
and unloading models, the face gallery).
Health, the docs and the playground stay open. ``neuroserve keys add NAME --scope infer`` makes a
key, prints it once and appends its hash.

A key's rate is a token bucket of ``requests_per_minute`` tokens refilled evenly: over it, 429
``rate_limited`` with ``Retry-After`` and the IETF ``RateLimit-Policy`` / ``RateLimit`` headers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from service.errors import Forbidden, RateLimited, Unauthenticated, describe_validation

Scope = Literal["infer", "metrics", "admin"]
KEY_PREFIX = "ns_"


class KeyRecord(BaseModel):
    name: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="hex SHA-256 of the key")
    scopes: list[Scope] = Field(min_length=1)
    requests_per_minute: int | None = Field(None, ge=1)


_RECORDS = TypeAdapter(list[KeyRecord])


def load_keys(path: Path) -> list[KeyRecord]:
    try:
        records = _RECORDS.validate_json(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc}") from None
    except ValidationError as exc:
        raise ValueError(f"{path}: {describe_validation(exc.errors())}") from None
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: key names must be unique")
    return records


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def add_key(path: Path, name: str, scopes: list[str], requests_per_minute: int | None) -> str:
    """A new key for ``name``, its hash appended to the keys file; the key itself is returned."""
    records = load_keys(path) if path.exists() else []
    if any(r.name == name for r in records):
        raise ValueError(f"{path}: a key named {name!r} exists already")
    key = new_key()
    records.append(
        KeyRecord(name=name, sha256=digest(key), scopes=scopes, requests_per_minute=requests_per_minute)  # type: ignore[arg-type]
    )
    path.write_text(json.dumps([r.model_dump(exclude_none=True) for r in records], indent=2) + "\n")
    return key


@dataclass
class _Bucket:
    capacity: float
    per_s: float
    tokens: float
    at: float = field(default_factory=time.monotonic)

    def take(self) -> tuple[bool, float, float]:
        """(allowed, tokens left, seconds until one token)."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True, self.tokens, 0.0
        return False, self.tokens, (1 - self.tokens) / self.per_s


class KeyStore:
    def __init__(self, records: list[KeyRecord]) -> None:
        self.records = records
        self._hashes = [bytes.fromhex(r.sha256) for r in records]
        self._buckets = {
            r.name: _Bucket(r.requests_per_minute, r.requests_per_minute / 60, r.requests_per_minute)
            for r in records
            if r.requests_per_minute
        }
        self._lock = threading.Lock()

    def identify(self, key: str | None) -> KeyRecord:
        if not key:
            raise Unauthenticated("an API key is required: send Authorization: Bearer <key> or X-API-Key: <key>")
        presented = hashlib.sha256(key.encode()).digest()
        found = None
        for record, stored in zip(self.records, self._hashes, strict=True):
            if hmac.compare_digest(presented, stored):  # every hash compared: no early exit to time
                found = record
        if found is None:
            raise Unauthenticated("the API key is not valid")
        return found

    def authorize(self, key: str | None, scope: Scope) -> tuple[KeyRecord, dict[str, str]]:
        """The key's record and its rate headers; raises 401, 403 or 429."""
        record = self.identify(key)
        if scope not in record.scopes:
            raise Forbidden(f"the key {record.name!r} does not have the {scope!r} scope")
        bucket = self._buckets.get(record.name)
        if bucket is None:
            return record, {}
        with self._lock:
            allowed, left, wait_s = bucket.take()
        limit = int(bucket.capacity)
        reset = math.ceil((bucket.capacity - left) / bucket.per_s)
        headers = {
            "RateLimit-Policy": f'"{record.name}";q={limit};w=60',
            "RateLimit": f'"{record.name}";r={int(left)};t={reset}',
        }
        if not allowed:
            retry = max(1, math.ceil(wait_s))
            raise RateLimited(
                f"the key {record.name!r} is over its {limit} requests per minute; retry in {retry} s",
                headers={**headers, "Retry-After": str(retry)},
            )
        return record, headers


def scope_of(method: str, path: str) -> Scope | None:
    """The scope a request needs, or None for what stays open (probes, docs, playground, CORS)."""
    if method == "OPTIONS" or path.startswith("/v2/health/") or path in ("/", "/docs", "/redoc", "/openapi.json"):
        return None
    if path.startswith("/static/") or path.startswith("/docs/"):
        return None
    if path == "/metrics" or (path.startswith("/v2/models") and path.endswith("/stats")):
        return "metrics"  # operators' figures (Triton's statistics extension too)
    if path == "/v2/models" or path.startswith("/v2/repository/"):
        return "admin"  # the index, and loading and unloading models
    if path == "/v1/faces" or path.startswith("/v1/faces/") or path == "/v1/face-identification":
        return "admin"  # the face gallery: people's names and their face vectors
    return "infer"


def presented_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"x-api-key":
            return value.decode("latin-1").strip()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None
