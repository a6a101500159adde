"""The one table from domain errors to gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from embedserve import errors
from embedserve.errors import (
    STATUS_CODES,
    CancelledRequestError,
    ConfigError,
    DeadlineExpiredError,
    EmbedServeError,
    EngineFailedError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    StreamIdleError,
    UnauthenticatedError,
    WrongModelKindError,
    status_for,
)


@pytest.mark.parametrize(
    ("error_type", "code"),
    [
        (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
        (ModelNotFoundError, grpc.StatusCode.NOT_FOUND),
        (WrongModelKindError, grpc.StatusCode.FAILED_PRECONDITION),
        (OverloadedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExpiredError, grpc.StatusCode.DEADLINE_EXCEEDED),
        (CancelledRequestError, grpc.StatusCode.CANCELLED),
        (UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
        (StreamIdleError, grpc.StatusCode.UNAVAILABLE),
        (EngineFailedError, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_domain_error_maps_to_its_status_code_with_its_message(
    error_type: type[EmbedServeError], code: grpc.StatusCode
) -> None:
    assert status_for(error_type("what to change")) == (code, "what to change")


def test_every_domain_error_in_the_module_has_a_status_code() -> None:
    domain = {
        value
        for value in vars(errors).values()
        if isinstance(value, type) and issubclass(value, EmbedServeError) and value is not EmbedServeError
    }
    assert domain == set(STATUS_CODES)


def test_a_subclass_of_a_domain_error_gets_its_parents_code() -> None:
    class TooManyInputsError(InvalidInputError):
        pass

    assert status_for(TooManyInputsError("at most 2048 inputs")) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "at most 2048 inputs",
    )


def test_a_configuration_error_is_a_startup_error_with_no_status_code() -> None:
    # Raised before the server serves; one that reached a caller would be a bug.
    assert not issubclass(ConfigError, EmbedServeError)
    assert ConfigError.__name__ not in {error.__name__ for error in STATUS_CODES}


@pytest.mark.parametrize("error", [ValueError("boom"), KeyError("k"), EmbedServeError("bare base")])
def test_anything_else_is_internal_and_names_the_exception_type(error: BaseException) -> None:
    code, message = status_for(error)
    assert code == grpc.StatusCode.INTERNAL
    assert message.startswith(f"internal error ({type(error).__name__}): ")
    assert str(error) in message


def test_a_message_that_names_capabilities_is_rendered_in_each_services_words() -> None:
    from embedserve import convert
    from embedserve.kinds import Capability

    def message(say: errors.Words) -> str:
        answers = ", ".join(say(Capability.EMBED) + say(Capability.RERANK))
        return f"answers {answers}, not {say(Capability.SPARSE_EMBED)[0]}"

    error = WrongModelKindError(message)
    assert str(error) == "answers embed, rerank, not sparse_embed"
    assert status_for(error, convert.rpc_words) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "answers Embed, EmbedStream, Rerank, not SparseEmbed",
    )
    assert status_for(error, convert.route_words)[1] == "answers embeddings, rerank, not embed_sparse"
