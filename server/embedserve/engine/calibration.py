"""The startup measurement of a model's forward pass, kept on disk so that a restart on the same
machine skips it.

Timing a dozen batch shapes takes 1-1.5 s a model on 2 cores, most of a server's start once its
export is cached. The measurement depends on the model files, the backend (provider, dtype,
threads), the batch limits, the library versions and the CPU, so all of these make up the key of
the file it is kept in (`<cache dir>/calibration/<key>.json`). Removing the file measures again
at the next start. The cost model follows the batches served from there on anyway
(`BatchCost.observe`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from embedserve.engine.cost import Measured

log = logging.getLogger(__name__)

_FORMAT = 1  # bump when what is measured, or how, changes
_LIBRARIES = ("onnxruntime", "onnxruntime-gpu", "torch", "numpy")


@functools.cache
def machine() -> dict[str, Any]:
    """What the CPU and the libraries are: part of every key (read once a process)."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                cpu += line.split(":", 1)[1].strip() + ";"
    except OSError:
        cpu = platform.processor()
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return {"cpu": cpu, "cores": os.cpu_count(), "versions": versions}


def model_files(path: Path) -> list[tuple[str, int, int]]:
    """Name, size and mtime of each file of a model folder: a changed model is another key."""
    try:
        return sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    except OSError:
        return []


def cached_measurement(
    cache_dir: Path, identity: Mapping[str, Any], measure: Callable[[], list[Measured]]
) -> tuple[list[Measured], Path | None]:
    """The measurement kept for `identity` on this machine, and its file; else `measure()`, kept
    for the next start, and None. A file that cannot be read or written is measured around."""
    key = json.dumps({"format": _FORMAT, **identity, **machine()}, sort_keys=True, default=str)
    path = cache_dir / "calibration" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    try:
        kept = json.loads(path.read_text())
        if kept.get("key") == key:
            return [(int(c), int(n), float(s)) for c, n, s in kept["measured"]], path
    except (OSError, ValueError, KeyError, TypeError):
        pass
    measured = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"key": key, "measured": measured}))
        partial.replace(path)
    except OSError as exc:
        log.warning("cannot keep the forward-pass measurement in %s: %s; the next start measures again", path, exc)
    return measured, None
