"""Entry point: flags + env -> Settings, logging, load models, serve."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Sequence

from embedserve.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the server; returns the process exit code."""
    from embedserve.settings import load_settings

    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"embedserve: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    log = logging.getLogger("embedserve")
    from embedserve.app import serve
    from embedserve.engine.engine import Engine

    try:
        loop_factory = event_loop_factory(settings.event_loop)  # before the models: it fails in no time
        engine = Engine.load(settings)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(settings, engine))
    return 0


def configure_logging(level: str, force: bool = False) -> None:
    """The server's log lines, on stderr, at LOG_LEVEL; `force` replaces handlers that an import
    already installed on the root logger."""
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=force
    )


def event_loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """EVENT_LOOP's loop: uvloop's (for "uvloop", and for "auto" where it is installed), or None
    for asyncio's own. grpc.aio accepts every new call through a few turns of the loop, one call
    per method at a time, so how fast a turn is sets how fast calls are even refused: under an 8x
    overload asyncio's loop fell seconds behind where uvloop's kept refusals in tens of ms
    (docs/benchmarks.md)."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError("EVENT_LOOP=uvloop, but uvloop is not installed: pip install uvloop") from None
        return None
    return uvloop.new_event_loop


if __name__ == "__main__":
    sys.exit(main())
