"""A running server's `Engine.embed`, counted and held on demand, so that "the model ran once" is
a count and "the first call is still running" a fact, not a race won by a big request."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tests.conftest import RunningServer


class HeldEmbed:
    """Counts the embed calls that reach `server`'s engine (native Embed and REST embeddings) and,
    inside `holding()`, keeps them waiting until the block ends."""

    def __init__(self, server: RunningServer) -> None:
        self.calls = 0
        self._server = server
        self._changed = threading.Condition()
        self._open = asyncio.Event()  # bound to the server's loop when first awaited there
        self._open.set()
        real = server.engine.embed

        async def embed(*args: Any, **kwargs: Any) -> Any:
            with self._changed:
                self.calls += 1
                self._changed.notify_all()
            await self._open.wait()
            return await real(*args, **kwargs)

        server.engine.embed = embed  # type: ignore[method-assign]

    @contextmanager
    def holding(self) -> Iterator[None]:
        """Embed calls that reach the engine while the block runs wait for its end."""
        self._server.call(self._set, False)  # type: ignore[no-untyped-call]
        try:
            yield
        finally:
            self._server.call(self._set, True)  # type: ignore[no-untyped-call]

    def wait_for_calls(self, count: int, timeout: float = 60) -> None:
        """Returns once `count` embed calls have reached the engine in all."""
        with self._changed:
            assert self._changed.wait_for(lambda: self.calls >= count, timeout), f"{self.calls} of {count} calls"

    async def _set(self, opened: bool) -> None:
        if opened:
            self._open.set()
        else:
            self._open.clear()
