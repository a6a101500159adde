"""The official OpenAI Python SDK, unchanged, against http://<envoy>/v1."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import RunningServer
from tests.e2e.conftest import Gateway, grpc_vectors

TEXTS = ["The quick brown fox.", "Une phrase en français.", "数据库索引", "short"]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="unused", max_retries=0)


def test_default_base64_batch_equals_grpc_vectors(client: openai.OpenAI, server: RunningServer) -> None:
    response = client.embeddings.create(model=DEFAULT_DENSE_MODEL, input=TEXTS)
    assert [d.index for d in response.data] == [0, 1, 2, 3]
    got = np.array([d.embedding for d in response.data], dtype=np.float32)
    np.testing.assert_array_equal(got, grpc_vectors(server, TEXTS))
    assert response.model == DEFAULT_DENSE_MODEL
    assert isinstance(response.usage.prompt_tokens, int) and response.usage.prompt_tokens > len(TEXTS)


def test_float_single_string_equals_grpc_vector(client: openai.OpenAI, server: RunningServer) -> None:
    response = client.embeddings.create(model=DEFAULT_DENSE_MODEL, input="hello world", encoding_format="float")
    assert len(response.data) == 1 and response.data[0].index == 0
    np.testing.assert_array_equal(
        np.array(response.data[0].embedding, np.float32), grpc_vectors(server, ["hello world"])[0]
    )


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
def test_dimensions_truncates_and_renormalizes_like_grpc(
    client: openai.OpenAI, server: RunningServer, encoding_format: str
) -> None:
    response = client.embeddings.create(
        model=DEFAULT_DENSE_MODEL,
        input=TEXTS,
        dimensions=64,
        encoding_format=encoding_format,  # type: ignore[arg-type]
    )
    # Asked for explicitly, base64 comes back undecoded (the SDK decodes only its own default).
    got = np.array(
        [
            np.frombuffer(base64.b64decode(d.embedding), "<f4") if isinstance(d.embedding, str) else d.embedding
            for d in response.data
        ],
        dtype=np.float32,
    )
    assert got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(got, grpc_vectors(server, TEXTS, dimensions=64))


def test_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert DEFAULT_DENSE_MODEL in models
    assert models[DEFAULT_DENSE_MODEL].object == "model"
    assert models[DEFAULT_DENSE_MODEL].owned_by == "infinity"


def test_unknown_model_raises_not_found_with_the_servers_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.embeddings.create(model="no/such-model", input="x")
    assert raised.value.status_code == 404
    assert "'no/such-model' is not served" in raised.value.message
    assert DEFAULT_DENSE_MODEL in raised.value.message  # says what to use instead
    assert raised.value.code == "not_found"


def test_bad_input_raises_bad_request_with_the_servers_message(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=DEFAULT_DENSE_MODEL, input=["fine", ""])
    assert "inputs[1] is an empty string" in raised.value.message
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model=DEFAULT_DENSE_MODEL, input=[[101, 2023, 102]])
    assert "token ids are not supported" in raised.value.message
