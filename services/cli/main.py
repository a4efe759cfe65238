"""The `clipsearch` entry point: argument parsing, dispatch, and one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from services.cli.client import CliError, Gateway, resolve_url
from services.cli.commands import run_admin_check, run_job, run_jobs, run_search
from services.cli.ingest import parse_metadata, run_ingest

PROG = "clipsearch"


def _positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, not {text}")
    return value


def _common() -> argparse.ArgumentParser:
    """--url and --api-key, accepted before or after the command."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=argparse.SUPPRESS,
        help="gateway URL (default: $CLIPSEARCH_URL, $GATEWAY_URL, http://127.0.0.1:8000)",
    )
    common.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="API key sent as 'Authorization: Bearer KEY' (default: $CLIPSEARCH_API_KEY)",
    )
    return common


def _add_ingest(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """The ingest command's arguments."""
    p = commands.add_parser(
        "ingest",
        parents=[common],
        help="upload images, folders, globs and zip/tar archives; wait until indexed",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="file, folder, glob or archive")
    p.add_argument("--batch-files", type=_positive_int, default=256, help="files per request")
    p.add_argument("--batch-mb", type=_positive_float, default=64.0, help="MB per request")
    p.add_argument("--metadata", help="a JSON object stored with every image")
    p.add_argument("--tag", action="append", default=[], help="add a tag (repeatable)")
    p.add_argument("--no-wait", action="store_true", help="return once uploaded")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _add_search(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    """The search command's arguments."""
    p = commands.add_parser("search", parents=[common], help="text (or --image) search")
    p.add_argument("text", nargs="?", help="what to look for")
    p.add_argument("--image", type=Path, help="search with this image instead of text")
    p.add_argument("-k", type=_positive_int, default=10, help="number of hits (default 10)")
    p.add_argument("--min-score", type=float, help="drop hits scoring below this cosine")
    p.add_argument("--job-id", help="only images from this job (text search)")
    p.add_argument("--tag", help="only images with this tag (text search)")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON answer")
    p.add_argument("--grid", type=Path, metavar="OUT.png", help="write a thumbnail grid image")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog=PROG, parents=[common], description="Text-to-image search from the command line."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_ingest(commands, common)
    p = commands.add_parser("jobs", parents=[common], help="list recent jobs")
    p.add_argument("--limit", type=_positive_int, default=20, help="how many (default 20)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p = commands.add_parser("job", parents=[common], help="show one job")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_search(commands, common)
    admin = commands.add_parser("admin", parents=[common], help="operators' commands")
    admin_commands = admin.add_subparsers(dest="admin_command", required=True)
    p = admin_commands.add_parser(
        "check",
        parents=[common],
        help="compare the blob store, Milvus and the job records (exit 1 on drift)",
    )
    p.add_argument(
        "--repair",
        action="store_true",
        help="embed bytes without vectors again, remove vectors without bytes",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def dispatch(args: argparse.Namespace) -> int:
    """Run the chosen command against the gateway."""
    api_key = getattr(args, "api_key", None) or os.environ.get("CLIPSEARCH_API_KEY") or None
    if args.command == "ingest":
        metadata = parse_metadata(raw=args.metadata, tags=args.tag)
    if args.command == "search" and (args.text is None) == (args.image is None):
        raise CliError("search needs TEXT or --image FILE (one of them)")
    if args.command == "search" and args.image is not None and (args.job_id or args.tag):
        raise CliError("--job-id and --tag apply to text search only")
    with Gateway(url=resolve_url(getattr(args, "url", None)), api_key=api_key) as gateway:
        if args.command == "ingest":
            limits = (args.batch_files, int(args.batch_mb * 1024 * 1024))
            return run_ingest(
                gateway=gateway,
                paths=args.paths,
                metadata=metadata,
                limits=limits,
                wait=not args.no_wait,
                as_json=args.json,
            )
        if args.command == "jobs":
            return run_jobs(gateway=gateway, limit=args.limit, as_json=args.json)
        if args.command == "job":
            return run_job(gateway=gateway, job_id=args.job_id, as_json=args.json)
        if args.command == "admin":
            return run_admin_check(gateway=gateway, repair=args.repair, as_json=args.json)
        query = {
            "text": args.text,
            "image": args.image,
            "k": args.k,
            "min_score": args.min_score,
            "job_id": args.job_id,
            "tag": args.tag,
        }
        return run_search(gateway=gateway, query=query, as_json=args.json, grid=args.grid)


def _fail(message: str) -> None:
    """Print one error line on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv), run the command, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage or help
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return dispatch(args)
    except CliError as exc:
        _fail(exc.message)
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted (jobs already submitted go on; see `clipsearch jobs`)")
        return 130
    except BrokenPipeError:  # e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if os.environ.get("CLIPSEARCH_DEBUG"):
            raise
        _fail(f"unexpected error: {exc.__class__.__name__}: {exc} (CLIPSEARCH_DEBUG=1 shows more)")
        return 2


if __name__ == "__main__":
    sys.exit(main())
