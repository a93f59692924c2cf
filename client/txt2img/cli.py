"""The `txt2img` command: generate images, read, list or cancel jobs, and verify an image's
provenance."""

import argparse
import base64
import contextlib
import re
import sys
from argparse import ArgumentParser
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO, cast

from txt2img._core import GenerationFields, atomic_file
from txt2img.client import Client
from txt2img.errors import Conflict, JobFailed, Txt2ImgError
from txt2img.models import OUTPUT_FORMATS, SCHEDULERS, JobOut, JobStatus, Preview, Progress
from txt2img.settings import DEFAULT_API_URL
from txt2img.version import __version__

EXTENSIONS: dict[str, str] = {"png": "png", "jpeg": "jpg", "webp": "webp"}
FORMAT_BY_SUFFIX: dict[str, str] = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
EXIT_ERROR = 1
# `verify`: the check ran, and found neither a valid manifest nor this service's watermark.
EXIT_UNMARKED = 3
EXIT_INTERRUPTED = 130
_LORA = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?::(?P<scale>[^:]+))?$")
_CONTROL = re.compile(r"^(?P<type>[a-z0-9][a-z0-9_-]*):(?P<file>.+)$")

Command = Callable[[Client, argparse.Namespace], int]


class Interrupted(Exception):
    """Ctrl-C while following a job, after canceling it."""


class ProgressBar:
    """A one-line progress bar, redrawn in place on `stream`."""

    def __init__(self, stream: TextIO, width: int = 30) -> None:
        self.stream = stream
        self.width = width
        self.drawn = False
        # Said after the bar: where the latest live preview was saved.
        self.note = ""

    def __call__(self, progress: Progress) -> None:
        total = max(progress.total, 1)
        filled = round(self.width * min(progress.step, total) / total)
        eta = f" eta {progress.eta_s:.1f}s" if progress.eta_s is not None else ""
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r[{bar}] {progress.step}/{progress.total}{eta}{self.note}   ")
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
        "model": args.model,
        "width": args.width,
        "height": args.height,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "scheduler": args.scheduler,
        "seed": args.seed,
        "num_images": args.num_images,
        "output_format": output_format,
        "priority": args.priority,
        "preview": _preview_spec(args),
        "init_image": _base64(args.init_image),
        "mask_image": _base64(args.mask),
        "strength": args.strength,
        "loras": args.lora or None,
        "control": _control_spec(args.control),
    }
    return cast(
        GenerationFields, {name: value for name, value in pairs.items() if value is not None}
    )


def _base64(path: Path | None) -> str | None:
    return None if path is None else base64.b64encode(path.read_bytes()).decode()


def _control_spec(control: tuple[str, Path] | None) -> dict[str, object] | None:
    if control is None:
        return None
    kind, path = control
    return {"type": kind, "image": _base64(path)}


def _lora_option(value: str) -> dict[str, object]:
    """`--lora NAME[:SCALE]`: a LoRA adapter, at scale 1 unless SCALE says otherwise."""
    match = _LORA.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not NAME or NAME:SCALE (e.g. tiny-style:0.8)"
        )
    scale = match["scale"]
    if scale is None:
        return {"name": match["name"], "scale": 1.0}
    try:
        number = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: the scale {scale!r} is not a number (NAME:SCALE, e.g. tiny-style:0.8)"
        ) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{value!r}: the scale must be a finite number")
    return {"name": match["name"], "scale": number}


def _image_file(value: str) -> Path:
    """An input image file that exists (the server checks that it is an image)."""
    path = Path(value)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {value}")
    return path


def _control_option(value: str) -> tuple[str, Path]:
    """`--control TYPE:FILE`: a ControlNet type of `GET /v1/models` and its image."""
    match = _CONTROL.match(value)
    if match is None:
        raise argparse.ArgumentTypeError(f"{value!r} is not TYPE:FILE (e.g. canny:photo.png)")
    return match["type"], _image_file(match["file"])


def _strength(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return number


def _check_generate(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """What one option needs of another, as an argparse error."""
    if args.init_image is None:
        for given, option in ((args.mask, "--mask"), (args.strength, "--strength")):
            if given is not None:
                parser.error(f"{option} needs --init-image")
    elif args.control is not None:
        parser.error("--control does not combine with --init-image")


def _preview_spec(args: argparse.Namespace) -> dict[str, object] | None:
    if args.preview is None:
        return None
    jpeg = Path(args.preview).suffix.lower() in (".jpg", ".jpeg")
    return {"every_n_steps": args.preview_every, "format": "jpeg" if jpeg else "webp"}


def _preview_saver(path: Path, bar: ProgressBar) -> Callable[[Preview], None]:
    """Writes each newer live preview over `path`, and says so after the progress bar."""

    def save(preview: Preview) -> None:
        with atomic_file(path) as file:
            file.write(preview.data)
        bar.note = f" preview {path} (step {preview.step})"

    return save


def _output_path(args: argparse.Namespace, job: JobOut) -> Path:
    if args.output is not None:
        return Path(args.output)
    return Path(f"{job.id}.{EXTENSIONS[job.request.output_format]}")


def run_generate(client: Client, args: argparse.Namespace) -> int:
    job = client.submit(
        args.prompt, idempotency_key=args.idempotency_key, **_generation_fields(args)
    )
    if args.no_wait:
        # Alone on stdout, so that J=$(txt2img generate ... --no-wait) passes it on.
        print(job.model_dump_json(indent=2) if args.json else job.id, flush=True)
        return 0
    print(f"job {job.id}", flush=True)
    _save(client, _follow(client, job.id, args), args)
    return 0


def _follow(client: Client, job_id: str, args: argparse.Namespace) -> JobOut:
    """The job once it has ended, with a progress bar on a terminal; Ctrl-C cancels it."""
    # Only a terminal redraws a line in place; in a log file the bar would be noise.
    bar = ProgressBar(sys.stderr)
    show_bar = not args.quiet and sys.stderr.isatty()
    preview = getattr(args, "preview", None)
    try:
        on_preview = None if preview is None else _preview_saver(Path(preview), bar)
        job = client.wait(job_id, args.timeout, bar if show_bar else None, on_preview=on_preview)
    except KeyboardInterrupt:
        bar.finish()
        with contextlib.suppress(Conflict):
            client.cancel(job_id)
        raise Interrupted(f"interrupted; canceled job {job_id}") from None
    finally:
        bar.finish()
    if job.status is not JobStatus.SUCCEEDED:
        raise JobFailed(job)
    return job


def _save(client: Client, job: JobOut, args: argparse.Namespace) -> None:
    for path in client.download_all(job, _output_path(args, job)):
        print(f"saved {path}", flush=True)


def run_wait(client: Client, args: argparse.Namespace) -> int:
    job = _follow(client, args.job_id, args)
    print(f"job {job.id} {job.status.value}", flush=True)
    return 0


def run_download(client: Client, args: argparse.Namespace) -> int:
    job = client.get(args.job_id)
    if not job.status.is_terminal:
        raise Txt2ImgError(f"job {job.id} is {job.status.value}: `txt2img wait {job.id}` first")
    if job.status is not JobStatus.SUCCEEDED:
        raise JobFailed(job)
    _save(client, job, args)
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


def run_verify(client: Client, args: argparse.Namespace) -> int:
    verification = client.verify(Path(args.file))
    if args.json:
        print(verification.model_dump_json(indent=2))
    else:
        print(f"{args.file}: {verification.summary}")
        claims = verification.c2pa.claims
        for name in ("model_id", "model_sha256", "job_id", "image_index", "digital_source_type"):
            if claims.get(name) is not None:
                print(f"  {name}: {claims[name]}")
    marked = (verification.c2pa.present and verification.c2pa.valid) or verification.watermark.found
    return 0 if marked else EXIT_UNMARKED


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless its help already says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _subparser(commands: argparse._SubParsersAction, name: str, text: str) -> ArgumentParser:
    return commands.add_parser(name, help=text, description=text, formatter_class=HelpFormatter)


def _add_generate(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "generate", "render a prompt and save the image(s)")
    parser.add_argument("prompt", help="what the image shows")
    parser.add_argument(
        "-o",
        "--output",
        help="file to write (several images: NAME_0.EXT, NAME_1.EXT...); its suffix sets the "
        "format unless --format is given (default: JOB_ID.EXT in the current directory)",
    )
    parser.add_argument(
        "-n", "--negative-prompt", default="", help="what to keep out of the image (default: none)"
    )
    parser.add_argument(
        "-m",
        "--model",
        help="a model of `GET /v1/models` (default: the deployment's default model)",
    )
    parser.add_argument(
        "-W",
        "--width",
        type=int,
        help="pixels, a multiple of 8 (default: the model's family's size, 512 for SD 1.5, "
        "1024 for SDXL)",
    )
    parser.add_argument(
        "-H", "--height", type=int, help="pixels, a multiple of 8 (default: as --width)"
    )
    parser.add_argument("-s", "--steps", type=int, default=25, help="denoising steps")
    parser.add_argument("-g", "--guidance", type=float, default=7.5, help="guidance scale")
    parser.add_argument("--scheduler", default="dpmpp_2m", help=f"one of {', '.join(SCHEDULERS)}")
    parser.add_argument(
        "--seed", type=int, help="image i gets SEED + i (default: random, picked by the server)"
    )
    parser.add_argument("-N", "--num-images", type=int, default=1, help="images to render")
    parser.add_argument(
        "--priority",
        choices=["interactive", "batch"],
        default="batch",
        help="interactive jobs start before the same key's batch jobs",
    )
    parser.add_argument(
        "-f",
        "--format",
        choices=OUTPUT_FORMATS,
        help="image format (default: from the --output suffix, else png)",
    )
    parser.add_argument(
        "--idempotency-key",
        help="retrying with the same key returns the same job (default: none)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        help="give up waiting after this many seconds (default: wait until the job ends)",
    )
    parser.add_argument(
        "--preview",
        metavar="FILE",
        help="ask for live previews and keep the latest in FILE (.webp, or .jpg for JPEG) while "
        "the job renders (default: none)",
    )
    parser.add_argument(
        "--preview-every", type=int, default=5, help="with --preview: a preview every N steps"
    )
    parser.add_argument(
        "--lora",
        action="append",
        type=_lora_option,
        metavar="NAME[:SCALE]",
        help="apply a LoRA adapter of `GET /v1/loras`, at SCALE (default: 1); repeatable "
        "(default: none)",
    )
    parser.add_argument(
        "--init-image",
        type=_image_file,
        metavar="FILE",
        help="image-to-image: start from this PNG, JPEG or WebP (default: none)",
    )
    parser.add_argument(
        "--mask",
        type=_image_file,
        metavar="FILE",
        help="with --init-image, inpainting: white repaints, black keeps; the same size as the "
        "init image (default: none)",
    )
    parser.add_argument(
        "--strength",
        type=_strength,
        metavar="S",
        help="with --init-image: how far from it the result may move, in (0, 1] (default: the "
        "server's)",
    )
    parser.add_argument(
        "--control",
        type=_control_option,
        metavar="TYPE:FILE",
        help="ControlNet: follow FILE's structure by a control type of `GET /v1/models`, e.g. "
        "canny:photo.png (default: none)",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id alone and return")
    parser.add_argument("--json", action="store_true", help="with --no-wait: print the job")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="no progress bar (default: a bar on stderr when it is a terminal)",
    )
    parser.set_defaults(command=run_generate, generate_parser=parser)


def _add_status(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "status", "print a job as JSON")
    parser.add_argument("job_id", help="the id `generate` printed")
    parser.set_defaults(command=run_status)


def _add_wait(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "wait", "wait for a job to end; exits 1 unless it succeeded")
    parser.add_argument("job_id", help="the id `generate` printed")
    parser.add_argument(
        "--timeout",
        type=float,
        help="give up waiting after this many seconds (default: wait until the job ends)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(command=run_wait)


def _add_download(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "download", "save the images of a succeeded job")
    parser.add_argument("job_id", help="the id `generate` printed")
    parser.add_argument(
        "-o",
        "--output",
        help="file to write (several images: NAME_0.EXT, NAME_1.EXT...) (default: "
        "JOB_ID.EXT in the current directory)",
    )
    parser.set_defaults(command=run_download)


def _add_cancel(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "cancel", "cancel a queued or running job")
    parser.add_argument("job_id", help="the id `generate` printed")
    parser.set_defaults(command=run_cancel)


def _add_list(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(commands, "list", "list jobs, newest first")
    parser.add_argument(
        "--status",
        choices=[status.value for status in JobStatus],
        help="only jobs in this state (default: any)",
    )
    parser.add_argument("--limit", type=int, default=20, help="jobs per page")
    parser.add_argument(
        "--cursor", help="the page after the one that printed it (default: the first page)"
    )
    parser.set_defaults(command=run_list)


def _add_verify(commands: argparse._SubParsersAction) -> None:
    parser = _subparser(
        commands,
        "verify",
        "check an image's signed Content Credentials and invisible watermark; exits 0 when it "
        f"carries either, {EXIT_UNMARKED} when neither",
    )
    parser.add_argument("file", help="a PNG, JPEG or WebP image")
    parser.add_argument("--json", action="store_true", help="print the whole answer as JSON")
    parser.set_defaults(command=run_verify)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_generate,
    _add_status,
    _add_wait,
    _add_download,
    _add_cancel,
    _add_list,
    _add_verify,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="txt2img", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--api-url",
        help=f"the API's base URL (default: $T2I_API_URL, else {DEFAULT_API_URL})",
    )
    parser.add_argument("--api-key", help="the API key to send (default: $T2I_API_KEY)")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; the exit status is 0 on success, 1 on any error, 130 when interrupted
    (`verify`: 3 for an image with no mark of the service)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    if command is run_generate:
        _check_generate(args.generate_parser, args)
    try:
        with Client(args.api_url, args.api_key) as client:
            return command(client, args)
    except Txt2ImgError as exc:
        print(f"txt2img: error: {exc}", file=sys.stderr)
    except OSError as exc:
        reason = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
        print(f"txt2img: error: {reason}", file=sys.stderr)
    except Interrupted as exc:
        print(f"txt2img: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("txt2img: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
