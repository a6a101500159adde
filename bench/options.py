"""The options every server-vs-in-process bench takes, and the server flags made from them."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.inprocess import server_defaults


def bench_parser(
    module: str, doc: str | None, texts: int, texts_help: str, quick_help: str, seed_help: str
) -> argparse.ArgumentParser:
    """A bench's parser (usage: python -m MODULE) with the corpus options every bench takes:
    --texts (default `texts`), --quick and --seed."""
    p = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--texts", type=int, default=texts, help=f"{texts_help} (default {texts})")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--seed", type=int, default=0, help=f"{seed_help} (default 0)")
    return p


def add_shared_args(p: argparse.ArgumentParser) -> None:
    """Options every server-vs-in-process bench takes: batching, load shape, server and output."""
    defaults = server_defaults()
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help=f"forward-pass batch, in-process and --batch-sizes for the server (default {defaults.batch_size})",
    )
    p.add_argument("--request-size", type=int, default=32, help="items per request (default 32)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument(
        "--baseline-window",
        type=int,
        default=0,
        help="in-process: sort by length within windows of this many items, e.g. clients x request size "
        "to give it only what the server can see at once (default 0: sort all)",
    )
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=defaults.cache_dir,
        help=f"ONNX export cache, shared with the server (default {defaults.cache_dir})",
    )
    p.add_argument(
        "--intra-op-threads",
        type=int,
        default=defaults.intra_op_threads,
        help="threads per forward pass, in-process and server; 0 = cores (default 0)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for the server, repeatable, e.g. --server-arg=--stream-window=32",
    )
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the server")
    p.add_argument("--json-out", type=Path, help="also write the JSON summary to this file")


def add_baseline_arg(p: argparse.ArgumentParser, default: str) -> None:
    """--baseline REF: the commit whose server runs every phase too (bench.process.Baseline); '' skips it."""
    p.add_argument(
        "--baseline",
        default=default,
        metavar="REF",
        help=f"commit whose server runs every phase too, from a git worktree (default {default}); '' skips it",
    )


def check_positive(p: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Exits with a usage error when any of the named options is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")


def server_flags(args: argparse.Namespace, model: str) -> list[str]:
    """The flags for `python -m embedserve` that make the server run `model` (';'-separated
    names for several) as the in-process side runs it, then the --server-arg ones."""
    flags = ["--cache-dir", str(args.cache_dir), "--model-names", model]
    flags += ["--batch-sizes", str(args.batch_size), "--intra-op-threads", str(args.intra_op_threads)]
    return [*flags, *args.server_arg]
