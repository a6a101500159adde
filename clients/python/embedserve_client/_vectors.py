"""Dense vectors as the client hands them out, decoded from an EmbedResponse."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from embedserve_client._pb.embedserve.v1 import embedding_service_pb2 as pb

Vectors = npt.NDArray[np.float32]


def decode(response: pb.EmbedResponse) -> Vectors:
    """Turns a response's float32_le vectors into one (n, dim) array, in input order."""
    embeddings = sorted(response.embeddings, key=lambda e: e.index)
    if not embeddings:
        return np.empty((0, response.dimension), dtype=np.float32)
    if all(e.float32_le for e in embeddings):
        joined = b"".join(e.float32_le for e in embeddings)
        return np.frombuffer(joined, dtype="<f4").astype(np.float32, copy=False).reshape(len(embeddings), -1)
    return np.array([list(e.values) for e in embeddings], dtype=np.float32)
