"""API keys: stored only as SHA-256 hashes, each with a name, a rate limit, its share of the
worker pool (weight, cap on running jobs, allowed priorities) and a webhook secret."""

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis
from redis.asyncio import Redis as AsyncRedis

from shared.schema import PRIORITIES, SAFETY_ACTIONS, Priority, SafetyAction

KEY_PREFIX = "t2i_"
# The fair scheduler's scripts read a key's weight and cap from here too.
RECORD_PREFIX = "t2i:apikey:"
KEY_INDEX = "t2i:apikeys"


@dataclass(frozen=True)
class PoolShare:
    """A key's share of the worker pool."""

    # Relative to other keys with queued jobs: a key of weight 3 starts three jobs for one's one.
    weight: int = 1
    # Jobs sent to workers or running at once; 0: no cap.
    max_running: int = 0
    priorities: tuple[Priority, ...] = PRIORITIES

    def fields(self) -> dict[str, str | int]:
        return {
            "weight": self.weight,
            "max_running": self.max_running,
            "priorities": ",".join(self.priorities),
        }


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    rate_limit_per_min: int
    created_at: datetime
    share: PoolShare = PoolShare()
    # Stricter than the deployment's T2I_SAFETY_ACTION, or None to follow it.
    safety_action: SafetyAction | None = None
    # Set by the operator only: this key's images carry no invisible watermark (they are still
    # signed with a C2PA manifest).
    watermark_exempt: bool = False
    # Live previews every this many steps for the key's jobs that do not say (None: none).
    preview_every_n_steps: int | None = None


@dataclass(frozen=True)
class WebhookSecrets:
    current: str
    previous: str | None
    previous_valid_until: float | None

    def signing_secrets(self, now: float) -> list[str]:
        """The current secret, plus the previous one during the rotation overlap."""
        if self.previous and self.previous_valid_until and now < self.previous_valid_until:
            return [self.current, self.previous]
        return [self.current]


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _split(key: str) -> tuple[str, str] | None:
    """`t2i_<id>_<secret>` -> (id, whole key); None when it is not shaped like one of ours."""
    if not key.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = key[len(KEY_PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or not key_id.isalnum() or len(secret) < 32:
        return None
    return key_id, key


class ApiKeyStore:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    def create(
        self,
        name: str,
        rate_limit_per_min: int,
        share: PoolShare | None = None,
        safety_action: SafetyAction | None = None,
        watermark_exempt: bool = False,
        preview_every_n_steps: int | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key; the plain key is returned once and never stored."""
        share = share or PoolShare()
        key_id = secrets.token_hex(6)
        plain = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        created_at = datetime.now(UTC)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                RECORD_PREFIX + key_id,
                mapping={
                    "hash": _hash(plain),
                    "name": name,
                    "rate_limit_per_min": rate_limit_per_min,
                    "created_at": created_at.isoformat(),
                    "webhook_secret": new_webhook_secret(),
                    **share.fields(),
                    "safety_action": safety_action or "",
                    "watermark_exempt": int(watermark_exempt),
                    "preview_every_n_steps": preview_every_n_steps or 0,
                },
            )
            pipe.sadd(KEY_INDEX, key_id)
            pipe.execute()
        key = ApiKey(
            key_id,
            name,
            rate_limit_per_min,
            created_at,
            share,
            safety_action,
            watermark_exempt,
            preview_every_n_steps or None,
        )
        return key, plain

    def update(
        self,
        key_id: str,
        rate_limit_per_min: int | None = None,
        share: PoolShare | None = None,
        watermark_exempt: bool | None = None,
        preview_every_n_steps: int | None = None,
    ) -> ApiKey | None:
        """Change a key's limits; None when there is no such key. API processes see the change
        within their auth cache's lifetime, the scheduler at once."""
        if self.get(key_id) is None:
            return None
        fields: dict[str, str | int] = dict(share.fields()) if share else {}
        if rate_limit_per_min is not None:
            fields["rate_limit_per_min"] = rate_limit_per_min
        if watermark_exempt is not None:
            fields["watermark_exempt"] = int(watermark_exempt)
        if preview_every_n_steps is not None:
            # 0 turns the key's default off.
            fields["preview_every_n_steps"] = preview_every_n_steps
        if fields:
            self._redis.hset(RECORD_PREFIX + key_id, mapping=fields)
        return self.get(key_id)

    def authenticate(self, presented: str) -> ApiKey | None:
        parts = _split(presented)
        if parts is None:
            return None
        key_id, key = parts
        return _verified(key_id, key, self._redis.hgetall(RECORD_PREFIX + key_id))

    def get(self, key_id: str) -> ApiKey | None:
        record = self._redis.hgetall(RECORD_PREFIX + key_id)
        return _decode(key_id, record) if record else None

    def all(self) -> list[ApiKey]:
        keys = (self.get(key_id.decode()) for key_id in self._redis.smembers(KEY_INDEX))
        return sorted((key for key in keys if key), key=lambda key: key.created_at)

    def revoke(self, key_id: str) -> bool:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(RECORD_PREFIX + key_id)
            pipe.srem(KEY_INDEX, key_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def webhook_secrets(self, key_id: str) -> WebhookSecrets | None:
        current, previous, valid_until = self._redis.hmget(
            RECORD_PREFIX + key_id,
            ["webhook_secret", "previous_webhook_secret", "previous_valid_until"],
        )
        if current is None:
            return None
        return WebhookSecrets(
            current=current.decode(),
            previous=previous.decode() if previous else None,
            previous_valid_until=float(valid_until) if valid_until else None,
        )

    def rotate_webhook_secret(self, key_id: str, overlap_s: float, now: float) -> str | None:
        """A new current secret; the old one keeps signing for `overlap_s`."""
        secrets_now = self.webhook_secrets(key_id)
        if secrets_now is None:
            return None
        fresh = new_webhook_secret()
        self._redis.hset(
            RECORD_PREFIX + key_id,
            mapping={
                "webhook_secret": fresh,
                "previous_webhook_secret": secrets_now.current,
                "previous_valid_until": now + overlap_s,
            },
        )
        return fresh


class CachedKeys:
    """Authenticates from the event loop, remembering valid keys for `ttl_s`: a revoked key
    stops working within that long, in each API process."""

    def __init__(self, redis: AsyncRedis, ttl_s: float, max_entries: int = 10_000) -> None:
        self._redis = redis
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        # Keyed by the presented key's hash, so no plain key is kept in memory.
        self._valid: dict[str, tuple[float, ApiKey]] = {}

    async def authenticate(self, presented: str) -> ApiKey | None:
        parts = _split(presented)
        if parts is None:
            return None
        key_id, key = parts
        digest = _hash(key)
        now = time.monotonic()
        cached = self._valid.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        found = _verified(key_id, key, await self._redis.hgetall(RECORD_PREFIX + key_id))
        self._valid.pop(digest, None)
        if found is not None and self._ttl_s > 0:
            if len(self._valid) >= self._max_entries:
                self._valid.clear()
            self._valid[digest] = (now + self._ttl_s, found)
        return found


def _verified(key_id: str, key: str, record: dict[bytes, bytes]) -> ApiKey | None:
    stored = record.get(b"hash", b"").decode()
    # Compare even when the id is unknown, so timing does not tell ids apart.
    matches = hmac.compare_digest(stored or "0" * 64, _hash(key))
    return _decode(key_id, record) if record and matches else None


def _decode(key_id: str, record: dict[bytes, bytes]) -> ApiKey:
    # Keys made before pool shares existed have the defaults.
    priorities = record.get(b"priorities")
    share = PoolShare(
        weight=int(record.get(b"weight", 1)),
        max_running=int(record.get(b"max_running", 0)),
        priorities=tuple(
            priority for priority in PRIORITIES if priority in priorities.decode().split(",")
        )
        if priorities
        else PRIORITIES,
    )
    return ApiKey(
        id=key_id,
        name=record[b"name"].decode(),
        rate_limit_per_min=int(record[b"rate_limit_per_min"]),
        created_at=datetime.fromisoformat(record[b"created_at"].decode()),
        share=share,
        safety_action=_safety_action(record.get(b"safety_action", b"").decode()),
        watermark_exempt=record.get(b"watermark_exempt") == b"1",
        preview_every_n_steps=int(record.get(b"preview_every_n_steps", 0)) or None,
    )


def _safety_action(value: str) -> SafetyAction | None:
    return next((action for action in SAFETY_ACTIONS if action == value), None)
