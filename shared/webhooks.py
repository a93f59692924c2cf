"""Webhooks: the SSRF guard, Standard Webhooks signing, and the delivery records in Redis.

The API checks a webhook URL at submit; GPU workers and the API enqueue deliveries by task name;
CPU webhook workers (worker/webhooks.py) send them.
"""

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from redis import Redis

from shared.keys import job_key
from shared.schema import JobRecord, JobStatus, WebhookEvent
from shared.scripts import load_script
from shared.settings import WebhookSettings

DELIVER_TASK = "txt2img.webhook.deliver"
DUE_KEY = "t2i:webhooks:due"
_DELIVERY_PREFIX = "t2i:delivery:"

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRefused(ValueError):
    """The webhook URL may not be called."""


@dataclass(frozen=True)
class Target:
    """A checked webhook URL and the addresses it may be connected to."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: list[str]


# RFC 6052's well-known NAT64 prefix: the last 32 bits are the IPv4 address it is routed to.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses that the network routes an IPv6 address by: the mapped address; a
    Teredo server and client; a 6to4 router; a NAT64 destination."""
    if address.ipv4_mapped is not None:
        return [address.ipv4_mapped]
    if address.teredo is not None:
        return list(address.teredo)
    if address.sixtofour is not None:
        return [address.sixtofour]
    if address in _NAT64:
        return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]
    return []


def _forbidden_reason(address: IpAddress) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(address)):
        # Judged by what it reaches: every embedded address must be public. The prefix itself
        # is not (ipaddress calls all of Teredo's 2001::/32 private and NAT64 reserved).
        for inner in embedded:
            if reason := _forbidden_reason(inner):
                return f"{reason} (embedded in {address})"
        return None
    for label, forbidden in (
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("unspecified", address.is_unspecified),
        ("private", address.is_private),
        # fec0::/10, deprecated but still routed inside some networks; not `is_private`.
        ("site-local", isinstance(address, ipaddress.IPv6Address) and address.is_site_local),
        ("reserved", address.is_reserved),
    ):
        if forbidden:
            return f"{label} address {address}"
    if not address.is_global:
        return f"non-global address {address}"
    return None


def _allowed_by_list(host: str, address: IpAddress | None, allowlist: list[str]) -> bool:
    for entry in allowlist:
        if "/" in entry or _is_ip(entry):
            if address is not None and address in ipaddress.ip_network(entry, strict=False):
                return True
        elif host == entry:
            return True
    return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_webhook_url(url: str, settings: WebhookSettings) -> Target:
    """Resolve the URL's host and refuse it unless every address it resolves to may be called."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise WebhookRefused(f"not a valid URL: {exc}") from exc
    allowed_schemes = {"https"} if settings.https_only else {"https", "http"}
    if parts.scheme not in allowed_schemes:
        raise WebhookRefused(f"the scheme must be {' or '.join(sorted(allowed_schemes))}")
    if not parts.hostname:
        raise WebhookRefused("the URL has no host")
    if parts.username or parts.password:
        raise WebhookRefused("credentials in the URL are not accepted")
    host = parts.hostname.lower().rstrip(".")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookRefused(f"the host {host!r} does not resolve") from exc
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for text in addresses:
        address = ipaddress.ip_address(text.split("%")[0])
        if _allowed_by_list(host, address, settings.allowlist):
            continue
        reason = _forbidden_reason(address)
        if reason:
            raise WebhookRefused(f"{host} resolves to a {reason}; allow-list it to call it")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, path, addresses)


def pinned_url(target: Target) -> tuple[str, dict[str, str], dict[str, str]]:
    """(URL, headers, httpx extensions) that reach the checked address only, with the host's
    name in the Host header and TLS: a second DNS answer cannot redirect the request."""
    address = target.addresses[0]
    literal = f"[{address}]" if ":" in address else address
    url = f"{target.scheme}://{literal}:{target.port}{target.path}"
    host_header = target.host if target.port in (80, 443) else f"{target.host}:{target.port}"
    return url, {"host": host_header}, {"sni_hostname": target.host}


def signature(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """A Standard Webhooks `v1` signature."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{message_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(secrets: list[str], message_id: str, timestamp: int, body: bytes) -> dict:
    return {
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": " ".join(signature(s, message_id, timestamp, body) for s in secrets),
    }


def _event_of(record: JobRecord, event: WebhookEvent) -> bool:
    webhook = record.request.webhook
    return webhook is not None and event in webhook.events


def _delivery_key(delivery_id: str) -> str:
    return _DELIVERY_PREFIX + delivery_id


def _deliveries_of(job_id: str) -> str:
    return f"{job_key(job_id)}:webhooks"


def _attempts_of(delivery_id: str) -> str:
    return f"{_DELIVERY_PREFIX}{delivery_id}:attempts"


def _completed_of(job_id: str) -> str:
    return f"{job_key(job_id)}:webhooks:completed"


_CREATE_DELIVERY = load_script("create_delivery")


class Webhooks:
    """Delivery records and their attempts; enqueues sends on the webhook queue."""

    def __init__(
        self, redis: Redis, celery: Celery, settings: WebhookSettings, retention_s: int
    ) -> None:
        self._redis = redis
        self._celery = celery
        self._settings = settings
        self._retention_s = retention_s
        self._create_delivery = redis.register_script(_CREATE_DELIVERY)

    def job_event(self, record: JobRecord, status: JobStatus | None = None) -> str | None:
        """Enqueue the webhook a job's new state calls for, if it asked for one."""
        status = status or record.status
        if status.is_terminal:
            return self.enqueue(record, "completed")
        if status is JobStatus.RUNNING:
            return self.enqueue(record, "started")
        return None

    def enqueue(self, record: JobRecord, event: WebhookEvent) -> str | None:
        if not _event_of(record, event):
            return None
        assert record.request.webhook is not None
        delivery_id = "msg_" + uuid.uuid4().hex
        fields = {
            "job_id": record.id,
            "owner": record.owner or "",
            "event": event,
            "url": record.request.webhook.url,
            "status": "pending",
            "attempts": 0,
            "created_at": time.time(),
        }
        keys = [_delivery_key(delivery_id), _deliveries_of(record.id)]
        if event == "completed":
            # A job ends once, even when its end is written twice: an end that a Redis failover
            # undid is rendered and ended again.
            keys.append(_completed_of(record.id))
        args = [delivery_id, self._retention_s, *(x for pair in fields.items() for x in pair)]
        standing = self._create_delivery(keys=keys, args=args).decode()
        if standing != delivery_id:
            return None
        self.send_now(delivery_id)
        return delivery_id

    def send_now(self, delivery_id: str) -> None:
        self._celery.send_task(
            DELIVER_TASK, kwargs={"delivery_id": delivery_id}, queue=self._settings.webhook_queue
        )

    def get(self, delivery_id: str) -> dict[str, str] | None:
        raw = self._redis.hgetall(_delivery_key(delivery_id))
        return {k.decode(): v.decode() for k, v in raw.items()} if raw else None

    def update(self, delivery_id: str, **fields: Any) -> None:
        self._redis.hset(_delivery_key(delivery_id), mapping=fields)

    def record_attempt(self, delivery_id: str, attempt: dict[str, Any]) -> None:
        with self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(_attempts_of(delivery_id), json.dumps(attempt))
            pipe.expire(_attempts_of(delivery_id), self._retention_s)
            pipe.hincrby(_delivery_key(delivery_id), "attempts", 1)
            pipe.execute()

    def schedule_retry(self, delivery_id: str, due: float) -> None:
        self._redis.zadd(DUE_KEY, {delivery_id: due})

    def claim_due(self, now: float, count: int = 100) -> list[str]:
        """Deliveries whose retry time has come; each is claimed by one scheduler only."""
        claimed = []
        for member in self._redis.zrangebyscore(DUE_KEY, "-inf", now, start=0, num=count):
            if self._redis.zrem(DUE_KEY, member):
                claimed.append(member.decode())
        return claimed

    def for_job(self, job_id: str) -> list[dict[str, Any]]:
        deliveries = []
        for raw_id in self._redis.lrange(_deliveries_of(job_id), 0, -1):
            delivery_id = raw_id.decode()
            record = self.get(delivery_id)
            if record is None:
                continue
            attempts = [json.loads(a) for a in self._redis.lrange(_attempts_of(delivery_id), 0, -1)]
            deliveries.append(
                {
                    "webhook_id": delivery_id,
                    "event": record["event"],
                    "url": record["url"],
                    "status": record["status"],
                    "attempts": attempts,
                }
            )
        return deliveries

    def latest_for_job(self, job_id: str) -> str | None:
        latest = self._redis.lindex(_deliveries_of(job_id), -1)
        return latest.decode() if latest else None
