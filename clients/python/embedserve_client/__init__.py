"""Typed Python client for embedserve: dense, sparse and rerank over gRPC."""

from embedserve_client._async import AsyncClient, ModelInfo, RerankResult, SparseVector
from embedserve_client._sync import Client
from embedserve_client.errors import (
    AbortedError,
    AlreadyExistsError,
    CancelledError,
    DataLossError,
    DeadlineExceededError,
    EmbedServeError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
    UnknownError,
)

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "AsyncClient",
    "CancelledError",
    "Client",
    "DataLossError",
    "DeadlineExceededError",
    "EmbedServeError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "ModelInfo",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "RerankResult",
    "ResourceExhaustedError",
    "SparseVector",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
    "UnknownError",
]
