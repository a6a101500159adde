"""The sync client: the async client driven by an event loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, Literal, TypeVar, overload

from embedserve_client._async import AsyncClient, LoadBalancing, ModelInfo, RerankResult, SparseVector
from embedserve_client._bulk import OnInvalid
from embedserve_client._vectors import Vectors

T = TypeVar("T")


class Client:
    """A blocking embedserve client with the same methods and options as AsyncClient."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: bool = False,
        root_certificates: bytes | None = None,
        timeout: float | None = None,
        load_balancing: LoadBalancing = "pick_first",
    ) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedserve-client", daemon=True)
        self._thread.start()

        async def build() -> AsyncClient:
            return AsyncClient(
                target,
                api_key=api_key,
                tls=tls,
                root_certificates=root_certificates,
                timeout=timeout,
                load_balancing=load_balancing,
            )

        self._client = self._run(build())

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel and stops the background loop."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def embed(self, texts: Sequence[str], **kwargs: Any) -> Vectors:
        """Returns one dense vector per text as an (n, dim) float32 array; see AsyncClient.embed."""
        return self._run(self._client.embed(texts, **kwargs))

    def sparse_embed(self, texts: Sequence[str], **kwargs: Any) -> list[SparseVector]:
        """Returns one SPLADE vector per text; see AsyncClient.sparse_embed."""
        return self._run(self._client.sparse_embed(texts, **kwargs))

    def rerank(self, query: str, documents: Sequence[str], **kwargs: Any) -> list[RerankResult]:
        """Returns the documents' scores against the query, highest first; see AsyncClient.rerank."""
        return self._run(self._client.rerank(query, documents, **kwargs))

    def list_models(self) -> list[ModelInfo]:
        """Returns the models the server serves."""
        return self._run(self._client.list_models())

    @overload
    def bulk_embed(
        self, texts: Iterable[str], *, on_invalid: Literal["raise"] = "raise", **kwargs: Any
    ) -> Iterator[Vectors]: ...

    @overload
    def bulk_embed(self, texts: Iterable[str], *, on_invalid: OnInvalid, **kwargs: Any) -> Iterator[Vectors | None]: ...

    def bulk_embed(
        self, texts: Iterable[str], *, on_invalid: OnInvalid = "raise", **kwargs: Any
    ) -> Iterator[Vectors | None]:
        """Yields one vector per text, in input order, None for a skipped one (on_invalid="skip");
        see AsyncClient.bulk_embed for the options (batch_size, window, streams, ...). The streams
        run on the background loop, which reads ahead as far as the bounds let it while this
        thread consumes. A `skipped` list is filled on the background loop thread, each entry
        before its None is yielded here."""
        stream = self._client.bulk_embed(texts, on_invalid=on_invalid, **kwargs)

        async def step() -> tuple[bool, Vectors | None]:
            try:
                return True, await anext(stream)
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, vector = self._run(step())
                if not more:
                    return
                yield vector
        finally:
            self._run(stream.aclose())  # type: ignore[attr-defined]
