"""The server image's venv with and without torch (issue 12), from the Dockerfile stages' contents,
since no Docker engine runs here.

CPU: two venvs are built in a temporary folder, with this machine's Python and pip and the
constraints of requirements.lock, as the Dockerfile's stages build them: `full` (the `builder`
stage: torch's CPU build, then the project with its dependencies) and `lean` (the `serving`
stage: tools/serving_requirements.py's libraries, then the model packages and the project
without dependencies). Their installed size is measured (`du` of the venv).

GPU: the images install torch's CUDA build and onnxruntime-gpu, which are not built here. Their
wheels' sizes are read from the package index (PEP 691 JSON: file sizes and metadata, nothing is
downloaded but the metadata): torch at the lock's version for Linux x86_64 and CPython 3.12 (the
images' Python) with every wheel it requires there (nvidia-*, triton), and onnxruntime-gpu. These
are download sizes, compressed: installed, they take about 1.5-2x as much.

Usage: .venv/bin/python -m bench.image_size [--skip-cpu] [--json-out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from bench.harness import print_summary, step
from bench.report import table
from tools.serving_requirements import serving_requirements

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
INDEX = "https://pypi.org/simple"
# The images': Ubuntu 24.04's CPython 3.12 on x86-64 Linux.
IMAGE_ENV = {
    "python_version": "3.12",
    "python_full_version": "3.12.3",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
    "extra": "",
}
IMAGE_INTERPRETERS = {"cp312", "py3", "py312"}
IMAGE_ABIS = {"cp312", "abi3", "none"}


def locked(name: str) -> str:
    """The version requirements.lock pins `name` at (local label, such as +cpu, dropped)."""
    pattern = re.compile(rf"^{re.escape(name)}==([^+\s]+)", re.IGNORECASE | re.MULTILINE)
    match = pattern.search(LOCK.read_text())
    if match is None:
        raise SystemExit(f"{name} is not pinned in {LOCK}")
    return match.group(1)


# -- CPU: real venvs ------------------------------------------------------------------------------


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True, cwd=ROOT)


def _constraints(folder: Path) -> Path:
    """requirements.lock less its torch line, as the Dockerfile's stages use it."""
    path = folder / "constraints.txt"
    path.write_text("".join(line for line in LOCK.read_text().splitlines(True) if not line.startswith("torch==")))
    return path


def _venv_bytes(venv: Path) -> int:
    return sum(f.stat().st_size for f in venv.rglob("*") if f.is_file() and not f.is_symlink())


def cpu_venvs(folder: Path) -> dict[str, int]:
    """Builds the `full` and `lean` CPU venvs; their sizes in bytes."""
    constraints = _constraints(folder)
    sizes = {}
    for name in ("lean", "full"):
        venv = folder / name
        step(f"building the {name} venv in {venv}")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        if name == "full":
            _pip(venv, f"torch=={locked('torch')}")  # the CPU wheel on disk, as TORCH_VARIANT=cpu
            _pip(venv, "-c", str(constraints), ".")
        else:
            libraries, models = serving_requirements()
            _pip(venv, "-c", str(constraints), *libraries)
            _pip(venv, "--no-deps", "-c", str(constraints), *models, ".")
        shutil.rmtree(
            venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages" / "pip"
        )
        sizes[name] = _venv_bytes(venv)
    return sizes


# -- GPU: the index's file sizes ------------------------------------------------------------------


def _index(project: str) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{INDEX}/{canonicalize_name(project)}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        data: dict[str, Any] = json.load(answer)
    return data


def _fits_image(filename: str) -> bool:
    if not filename.endswith(".whl"):
        return False
    _, _, _, tags = parse_wheel_filename(filename)
    return any(_fits(tag) for tag in tags)


def _fits(tag: Tag) -> bool:
    platform_ok = tag.platform == "any" or ("linux" in tag.platform and tag.platform.endswith("x86_64"))
    return tag.interpreter in IMAGE_INTERPRETERS and tag.abi in IMAGE_ABIS and platform_ok


def image_wheel(project: str, specifier: SpecifierSet) -> tuple[str, int, str]:
    """(file name, size, metadata URL) of the newest wheel of `project` that `specifier` admits
    and that installs in the images."""
    best: tuple[Version, dict[str, Any]] | None = None
    for file in _index(project)["files"]:
        if file.get("yanked") or not _fits_image(file["filename"]):
            continue
        version = parse_wheel_filename(file["filename"])[1]
        if version in specifier and (best is None or version > best[0]):
            best = (version, file)
    if best is None:
        raise SystemExit(f"no wheel of {project} {specifier} for CPython 3.12 on x86-64 Linux in {INDEX}")
    file = best[1]
    return file["filename"], int(file["size"]), file["url"].split("#")[0] + ".metadata"


def _requirements(metadata_url: str, extras: frozenset[str] = frozenset()) -> Iterator[Requirement]:
    """The requirements a wheel's metadata lists that apply in the images, with `extras` asked for;
    none when the index has no metadata file for it (an upload from before PEP 658), said on stderr."""
    try:
        with urllib.request.urlopen(metadata_url, timeout=60) as answer:
            text = answer.read().decode()
    except urllib.error.HTTPError as error:
        step(f"  no metadata at {metadata_url} ({error.code}): its requirements are not followed")
        return
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.partition(":")[2].strip())
            marker = requirement.marker
            if marker is None or any(
                Marker(str(marker)).evaluate({**IMAGE_ENV, "extra": extra}) for extra in {"", *extras}
            ):
                yield requirement


def gpu_wheels(project: str, version: str, follow: Sequence[str]) -> list[tuple[str, int]]:
    """`project`'s wheel and, recursively, those of its requirements whose names start with one of
    `follow` (torch's own CUDA libraries: the rest it shares with the lean venv)."""
    wheels: dict[str, int] = {}
    todo = [Requirement(f"{project}=={version}")]
    seen: set[str] = set()
    while todo:
        requirement = todo.pop()
        key = f"{canonicalize_name(requirement.name)}{sorted(requirement.extras)}"
        if key in seen:
            continue
        seen.add(key)
        step(f"  {requirement}")
        filename, size, metadata_url = image_wheel(requirement.name, requirement.specifier)
        wheels[filename] = size
        for nested in _requirements(metadata_url, frozenset(requirement.extras)):
            if any(canonicalize_name(nested.name).startswith(p) for p in follow):
                todo.append(nested)
    return sorted(wheels.items())


# -- report ---------------------------------------------------------------------------------------


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    """Measures, prints a table and the summary line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.image_size", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--skip-cpu", action="store_true", help="only the GPU wheels (no venvs built)")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)

    report: list[str] = []
    summary: dict[str, Any] = {}
    if not args.skip_cpu:
        with tempfile.TemporaryDirectory(prefix="image-size-") as folder:
            sizes = cpu_venvs(Path(folder))
        summary["cpu_venv_bytes"] = sizes
        report += [
            "CPU image venv (installed, measured):",
            *table(
                [
                    ["full (builder: torch CPU, the exporter)", _mb(sizes["full"])],
                    ["lean (serving: runtime target)", _mb(sizes["lean"])],
                    ["saved", _mb(sizes["full"] - sizes["lean"])],
                ],
                ["venv", "MB"],
            ),
            "",
        ]
    step("reading the GPU wheels' sizes from the index")
    torch = gpu_wheels("torch", locked("torch"), ("torch", "nvidia-", "triton", "cuda-"))
    ort_gpu = image_wheel("onnxruntime-gpu", SpecifierSet(f"=={locked('onnxruntime')}"))[:2]
    torch_bytes = sum(size for _, size in torch)
    summary["gpu_wheel_bytes"] = {"torch_and_cuda_libraries": torch_bytes, "onnxruntime_gpu": ort_gpu[1]}
    summary["gpu_wheels"] = dict(torch)
    report += [
        "GPU images: wheels only the full image installs (download sizes, compressed):",
        *table([[name, _mb(size)] for name, size in torch], ["wheel", "MB"]),
        f"total left out of the lean GPU image: {_mb(torch_bytes)} MB compressed "
        f"(both images keep {ort_gpu[0]}, {_mb(ort_gpu[1])} MB, and the CUDA base image)",
    ]
    print_summary(report, summary, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
