"""Thin gRPC servicers: convert the request, await the engine, convert the response."""
