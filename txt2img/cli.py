"""The `txt2img` command: generate images, and read, list or cancel jobs."""

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO, cast, get_args

from shared.schema import JobOut, JobStatus, OutputFormat, Progress, Scheduler
from txt2img._core import GenerationFields
from txt2img.client import Client
from txt2img.errors import Conflict, JobFailed, Txt2ImgError
from txt2img.keys import add_keys_command

EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
FORMAT_BY_SUFFIX: dict[str, str] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

Command = Callable[[Client, argparse.Namespace], int]


class ProgressBar:
    """A one-line progress bar, redrawn in place on `stream`."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.drawn = False

    def __call__(self, progress: Progress) -> None:
        total = max(progress.total, 1)
        filled = round(self.width * min(progress.step, total) / total)
        eta = f" eta {progress.eta_s:.1f}s" if progress.eta_s is not None else ""
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {progress.step}/{progress.total}{eta}   ")
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _generation_fields(args: argparse.Namespace) -> GenerationFields:
    output_format = args.format
    if output_format is None and args.output is not None:
        output_format = FORMAT_BY_SUFFIX.get(Path(args.output).suffix.lower())
    pairs = {
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "num_images": args.num_images,
        "output_format": output_format,
    }
    return cast(
        GenerationFields, {name: value for name, value in pairs.items() if value is not None}
    )


def _output_path(args: argparse.Namespace, job: JobOut) -> Path:
    if args.output is not None:
        return Path(args.output)
    return Path(f"{job.id}.{EXTENSIONS[job.request.output_format]}")


def run_generate(client: Client, args: argparse.Namespace) -> int:
    job = client.submit(
        args.prompt, idempotency_key=args.idempotency_key, **_generation_fields(args)
    )
    print(f"job {job.id}", flush=True)
    if args.no_wait:
        return 0
    bar = ProgressBar(sys.stderr)
    try:
        job = client.wait(job.id, args.timeout, None if args.quiet else bar)
    except KeyboardInterrupt:
        bar.finish()
        with contextlib.suppress(Conflict):
            client.cancel(job.id)
        print(f"txt2img: interrupted; canceled job {job.id}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        bar.finish()
    if job.status is not JobStatus.SUCCEEDED:
        raise JobFailed(job)
    for path in client.download_all(job, _output_path(args, job)):
        print(f"saved {path}", flush=True)
    return 0


def run_status(client: Client, args: argparse.Namespace) -> int:
    print(client.get(args.job_id).model_dump_json(indent=2))
    return 0


def run_cancel(client: Client, args: argparse.Namespace) -> int:
    job = client.cancel(args.job_id)
    print(f"job {job.id} {job.status.value}")
    return 0


def run_list(client: Client, args: argparse.Namespace) -> int:
    page = client.list(status=args.status, limit=args.limit, cursor=args.cursor)
    for job in page.data:
        created = f"{job.created_at:%Y-%m-%d %H:%M:%S}"
        print(f"{job.id}  {job.status.value:<9}  {created}  {job.request.prompt[:60]}")
    if page.next_cursor:
        print(f"more: --cursor {page.next_cursor}", file=sys.stderr)
    return 0


def _add_generate(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("generate", help="render a prompt and save the image(s)")
    parser.add_argument("prompt")
    parser.add_argument(
        "-o",
        "--output",
        help="file to write (several images: NAME_0.EXT, NAME_1.EXT...); default JOB_ID.EXT; "
        "its suffix sets the format unless --format is given",
    )
    parser.add_argument("-n", "--negative-prompt")
    parser.add_argument("-W", "--width", type=int)
    parser.add_argument("-H", "--height", type=int)
    parser.add_argument("-s", "--steps", type=int, help="denoising steps")
    parser.add_argument("-g", "--guidance", type=float, help="guidance scale")
    parser.add_argument("--scheduler", choices=get_args(Scheduler))
    parser.add_argument("--seed", type=int)
    parser.add_argument("-N", "--num-images", type=int)
    parser.add_argument("-f", "--format", choices=get_args(OutputFormat))
    parser.add_argument("--idempotency-key", help="retrying with the same key returns the same job")
    parser.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(command=run_generate)


def _add_status(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("status", help="print a job as JSON")
    parser.add_argument("job_id")
    parser.set_defaults(command=run_status)


def _add_cancel(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("cancel", help="cancel a queued or running job")
    parser.add_argument("job_id")
    parser.set_defaults(command=run_cancel)


def _add_list(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("list", help="list jobs, newest first")
    parser.add_argument("--status", choices=[status.value for status in JobStatus])
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--cursor")
    parser.set_defaults(command=run_list)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_generate,
    _add_status,
    _add_cancel,
    add_keys_command,
    _add_list,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="txt2img", description=__doc__)
    parser.add_argument("--api-url", help="the API's base URL (default: $T2I_API_URL)")
    parser.add_argument("--api-key", help="the API key to send (default: $T2I_API_KEY)")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; the exit status is 0 on success, 1 on any error, 130 when interrupted."""
    args = build_parser().parse_args(argv)
    if hasattr(args, "offline_command"):
        return args.offline_command(args)
    command: Command = args.command
    try:
        with Client(args.api_url, args.api_key) as client:
            return command(client, args)
    except Txt2ImgError as exc:
        print(f"txt2img: error: {exc}", file=sys.stderr)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
        print(f"txt2img: error: {reason}", file=sys.stderr)
    except KeyboardInterrupt:
        print("txt2img: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
