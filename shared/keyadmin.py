"""Manage API keys directly in the service's Redis, an operator's tool:
`python -m shared.keyadmin create|list|revoke|dev` (installed as `txt2img-keys`)."""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from shared.apikeys import ApiKeyStore
from shared.queue import make_redis
from shared.schema import SAFETY_ACTIONS, SafetyAction
from shared.settings import Environment, api_settings, core_settings

PROG = "txt2img-keys"


class KeyAdminError(Exception):
    """An operator error, said in one line."""


def _store() -> tuple[ApiKeyStore, Redis]:
    redis = make_redis(core_settings())
    return ApiKeyStore(redis), redis


def create(
    name: str, rate_limit_per_min: int | None, safety_action: SafetyAction | None = None
) -> str:
    """Create a key and print it alone on the last line; it is never shown again."""
    store, _ = _store()
    limit = rate_limit_per_min or api_settings().rate_limit_per_min
    key, plain = store.create(name, limit, safety_action)
    safety = f", safety action {key.safety_action}" if key.safety_action else ""
    print(f"created key {key.id} ({key.name!r}, {key.rate_limit_per_min} jobs/min{safety})")
    print("keep it now: it is stored only as a hash and cannot be shown again")
    print(plain)
    return plain


def list_keys() -> None:
    store, _ = _store()
    keys = store.all()
    if not keys:
        print("no API keys")
    for key in keys:
        created = f"{key.created_at:%Y-%m-%d %H:%M:%S}"
        print(f"{key.id}  {created}  {key.rate_limit_per_min:>6} jobs/min  {key.name}")


def revoke(key_id: str) -> None:
    store, _ = _store()
    if not store.revoke(key_id):
        raise KeyAdminError(f"no API key with id {key_id!r}")
    print(f"revoked key {key_id}")


def ensure_development_key(path: Path) -> None:
    """The key `make run` uses: kept in `path` (mode 600), made anew when Redis lost it."""
    if core_settings().env is not Environment.DEVELOPMENT:
        raise KeyAdminError("a development key is only made when T2I_ENV=development")
    store, _ = _store()
    if path.is_file() and store.authenticate(path.read_text().strip()) is not None:
        print(f"API key (from {path}): {path.read_text().strip()}")
        return
    key, plain = store.create("development", api_settings().rate_limit_per_min)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(plain + "\n")
    os.chmod(path, 0o600)
    print(f"created development API key {key.id}, saved in {path}: {plain}")


def _run(args: argparse.Namespace) -> int:
    try:
        if args.action == "create":
            create(args.name, args.rate_limit, args.safety_action)
        elif args.action == "list":
            list_keys()
        elif args.action == "revoke":
            revoke(args.key_id)
        else:
            ensure_development_key(Path(args.file))
    except KeyAdminError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except RedisError as exc:
        print(f"{PROG}: error: Redis at T2I_REDIS_URL is unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Create, list and revoke API keys (talks to Redis at $T2I_REDIS_URL).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    create_parser = actions.add_parser("create", help="create a key; prints it on the last line")
    create_parser.add_argument("--name", required=True, help="who the key is for")
    create_parser.add_argument(
        "--rate-limit", type=int, help="jobs per minute (default: $T2I_RATE_LIMIT_PER_MIN)"
    )
    create_parser.add_argument(
        "--safety-action",
        choices=SAFETY_ACTIONS,
        help="for flagged images, stricter than $T2I_SAFETY_ACTION (default: follow it)",
    )
    actions.add_parser("list", help="list keys (never the keys themselves)")
    revoke_parser = actions.add_parser("revoke", help="revoke a key by its id")
    revoke_parser.add_argument("key_id", help="the id `list` shows")
    dev_parser = actions.add_parser(
        "dev",
        help="development: the key in FILE, made if needed",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    dev_parser.add_argument("--file", default="data/dev-api-key", help="where the key is kept")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
