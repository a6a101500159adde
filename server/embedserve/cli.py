"""Entry point: flags + env -> Settings, logging, load models, serve."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from embedserve.errors import ConfigError


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the server; returns the process exit code."""
    from embedserve.settings import load_settings

    try:
        settings = load_settings(argv)
    except ConfigError as exc:
        print(f"embedserve: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    log = logging.getLogger("embedserve")
    from embedserve.app import serve
    from embedserve.engine.engine import Engine

    try:
        engine = Engine.load(settings)
    except ConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    asyncio.run(serve(settings, engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
