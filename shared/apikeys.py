"""API keys: stored only as SHA-256 hashes, each with a name, a rate limit and a webhook secret."""

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from redis import Redis

from shared.schema import SAFETY_ACTIONS, SafetyAction

KEY_PREFIX = "t2i_"
_RECORD_PREFIX = "t2i:apikey:"
_INDEX = "t2i:apikeys"


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    rate_limit_per_min: int
    created_at: datetime
    # Stricter than the deployment's T2I_SAFETY_ACTION, or None to follow it.
    safety_action: SafetyAction | None = None


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
        self, name: str, rate_limit_per_min: int, safety_action: SafetyAction | None = None
    ) -> tuple[ApiKey, str]:
        """A new key; the plain key is returned once and never stored."""
        key_id = secrets.token_hex(6)
        plain = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        created_at = datetime.now(UTC)
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                _RECORD_PREFIX + key_id,
                mapping={
                    "hash": _hash(plain),
                    "name": name,
                    "rate_limit_per_min": rate_limit_per_min,
                    "created_at": created_at.isoformat(),
                    "webhook_secret": new_webhook_secret(),
                    "safety_action": safety_action or "",
                },
            )
            pipe.sadd(_INDEX, key_id)
            pipe.execute()
        return ApiKey(key_id, name, rate_limit_per_min, created_at, safety_action), plain

    def authenticate(self, presented: str) -> ApiKey | None:
        parts = _split(presented)
        if parts is None:
            return None
        key_id, key = parts
        record = self._redis.hgetall(_RECORD_PREFIX + key_id)
        stored = record.get(b"hash", b"").decode()
        # Compare even when the id is unknown, so timing does not tell ids apart.
        matches = hmac.compare_digest(stored or "0" * 64, _hash(key))
        return _decode(key_id, record) if record and matches else None

    def get(self, key_id: str) -> ApiKey | None:
        record = self._redis.hgetall(_RECORD_PREFIX + key_id)
        return _decode(key_id, record) if record else None

    def all(self) -> list[ApiKey]:
        keys = (self.get(key_id.decode()) for key_id in self._redis.smembers(_INDEX))
        return sorted((key for key in keys if key), key=lambda key: key.created_at)

    def revoke(self, key_id: str) -> bool:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(_RECORD_PREFIX + key_id)
            pipe.srem(_INDEX, key_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def webhook_secrets(self, key_id: str) -> WebhookSecrets | None:
        current, previous, valid_until = self._redis.hmget(
            _RECORD_PREFIX + key_id,
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
            _RECORD_PREFIX + key_id,
            mapping={
                "webhook_secret": fresh,
                "previous_webhook_secret": secrets_now.current,
                "previous_valid_until": now + overlap_s,
            },
        )
        return fresh


def _decode(key_id: str, record: dict[bytes, bytes]) -> ApiKey:
    return ApiKey(
        id=key_id,
        name=record[b"name"].decode(),
        rate_limit_per_min=int(record[b"rate_limit_per_min"]),
        created_at=datetime.fromisoformat(record[b"created_at"].decode()),
        safety_action=_safety_action(record.get(b"safety_action", b"").decode()),
    )


def _safety_action(value: str) -> SafetyAction | None:
    return next((action for action in SAFETY_ACTIONS if action == value), None)
