"""embedserve: dense, sparse and rerank models served over gRPC."""

__version__ = "0.1.0"
