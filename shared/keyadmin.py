"""Manage API keys directly in the service's Redis, an operator's tool:
`python -m shared.keyadmin create|update|list|revoke|dev` (installed as `txt2img-keys`)."""

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from shared.apikeys import ApiKey, ApiKeyStore, PoolShare
from shared.redisconn import make_redis
from shared.schema import MAX_STEPS, PRIORITIES, SAFETY_ACTIONS, Priority, SafetyAction
from shared.settings import Environment, api_settings, core_settings

PROG = "txt2img-keys"


class KeyAdminError(Exception):
    """An operator error, said in one line."""


def _store() -> tuple[ApiKeyStore, Redis]:
    redis = make_redis(core_settings())
    return ApiKeyStore(redis), redis


def _describe(key: ApiKey) -> str:
    share = key.share
    cap = share.max_running or "no cap"
    safety = f", safety action {key.safety_action}" if key.safety_action else ""
    exempt = ", no watermark" if key.watermark_exempt else ""
    every = key.preview_every_n_steps
    previews = f", previews every {every} steps" if every else ""
    return (
        f"{key.rate_limit_per_min} jobs/min, weight {share.weight}, max running {cap}, "
        f"priorities {','.join(share.priorities)}{safety}{exempt}{previews}"
    )


def _priorities(value: str) -> tuple[Priority, ...]:
    named = {part.strip() for part in value.split(",") if part.strip()}
    unknown = named - set(PRIORITIES)
    if unknown or not named:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(PRIORITIES)}, comma-separated")
    return tuple(priority for priority in PRIORITIES if priority in named)


def create(
    name: str,
    rate_limit_per_min: int | None,
    weight: int = 1,
    max_running: int | None = None,
    priorities: tuple[Priority, ...] = PRIORITIES,
    safety_action: SafetyAction | None = None,
    watermark_exempt: bool = False,
    preview_every_n_steps: int | None = None,
) -> str:
    """Create a key and print it alone on the last line; it is never shown again."""
    store, _ = _store()
    settings = api_settings()
    limit = rate_limit_per_min or settings.rate_limit_per_min
    cap = settings.max_running_per_key if max_running is None else max_running
    key, plain = store.create(
        name,
        limit,
        PoolShare(weight, cap, priorities),
        safety_action,
        watermark_exempt,
        preview_every_n_steps,
    )
    print(f"created key {key.id} ({key.name!r}, {_describe(key)})")
    print("keep it now: it is stored only as a hash and cannot be shown again")
    print(plain)
    return plain


def update(
    key_id: str,
    rate_limit_per_min: int | None,
    weight: int | None,
    max_running: int | None,
    priorities: tuple[Priority, ...] | None,
    watermark_exempt: bool | None = None,
    preview_every_n_steps: int | None = None,
) -> None:
    """Change what is given of a key's limits; the rest stays."""
    store, _ = _store()
    key = store.get(key_id)
    if key is None:
        raise KeyAdminError(f"no API key with id {key_id!r}")
    share = PoolShare(
        weight=key.share.weight if weight is None else weight,
        max_running=key.share.max_running if max_running is None else max_running,
        priorities=key.share.priorities if priorities is None else priorities,
    )
    updated = store.update(
        key_id, rate_limit_per_min, share, watermark_exempt, preview_every_n_steps
    )
    assert updated is not None
    print(f"updated key {key_id}: {_describe(updated)}")


def list_keys() -> None:
    store, _ = _store()
    keys = store.all()
    if not keys:
        print("no API keys")
    for key in keys:
        created = f"{key.created_at:%Y-%m-%d %H:%M:%S}"
        print(f"{key.id}  {created}  {key.name}: {_describe(key)}")


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
            create(
                args.name,
                args.rate_limit,
                args.weight or 1,
                args.max_running,
                args.priorities or PRIORITIES,
                args.safety_action,
                args.watermark_exempt or False,
                args.preview_every,
            )
        elif args.action == "update":
            update(
                args.key_id,
                args.rate_limit,
                args.weight,
                args.max_running,
                args.priorities,
                args.watermark_exempt,
                args.preview_every,
            )
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
    _share_arguments(create_parser, creating=True)
    _watermark_argument(create_parser)
    _preview_argument(create_parser)
    create_parser.add_argument(
        "--safety-action",
        choices=SAFETY_ACTIONS,
        help="for flagged images, stricter than $T2I_SAFETY_ACTION (default: follow it)",
    )
    update_parser = actions.add_parser("update", help="change a key's limits")
    update_parser.add_argument("key_id", help="the id `list` shows")
    update_parser.add_argument("--rate-limit", type=int, help="jobs per minute")
    _share_arguments(update_parser, creating=False)
    _watermark_argument(update_parser)
    _preview_argument(update_parser)
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


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _non_negative(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return number


def _watermark_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watermark-exempt",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="this key's images carry no invisible watermark (still a signed C2PA manifest); "
        "--no-watermark-exempt marks them again",
    )


def _preview_steps(value: str) -> int:
    number = int(value)
    if not 0 <= number <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be 0 to {MAX_STEPS}")
    return number


def _preview_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preview-every",
        type=_preview_steps,
        metavar="N",
        help="live previews every N steps for this key's jobs that ask for none themselves "
        "(0: none, the default)",
    )


def _share_arguments(parser: argparse.ArgumentParser, creating: bool) -> None:
    parser.add_argument(
        "--weight",
        type=_positive,
        help="share of the worker pool against other busy keys" + (" (default: 1)" * creating),
    )
    parser.add_argument(
        "--max-running",
        type=_non_negative,
        help="most jobs sent to workers or running at once, 0 for no cap"
        + (" (default: $T2I_MAX_RUNNING_PER_KEY)" * creating),
    )
    parser.add_argument(
        "--priorities",
        type=_priorities,
        help="the priorities its jobs may ask for: interactive,batch"
        + (" (default: both)" * creating),
    )


def main(argv: Sequence[str] | None = None) -> int:
    return _run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
