"""Benchmarks that print ratios measured in one run, each run as `python -m bench.<name>`:
embed, rerank_sparse, rest and ort_tuning. bench/README.md says how to run and read them.

Measuring and rendering are apart: process (server, Envoy, ports), harness (corpus, in-process
records, comparisons, the end of a run), options, inprocess (the server's own pieces; the only
module that imports embedserve's internals), load, phases and rest_phases (what runs against a
server) return data; report renders it and summary turns it into the JSON line.
"""
