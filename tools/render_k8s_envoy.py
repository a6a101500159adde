"""Writes deploy/base/envoy/envoy.yaml, Envoy's config in the Kubernetes manifests, with
envoy/gateway.py's write_config (as `make run` and the Dockerfile's envoy stage render it) for an
upstream that is the headless Service's DNS name, so that its STRICT_DNS cluster resolves to every
ready server pod. Committed, because `kubectl apply -k` reads files and cannot run Python;
tests/deploy/test_manifests.py checks that it is what this script writes now.

Usage: python tools/render_k8s_envoy.py    (after a change to envoy/, proto/, or the namespace or
the headless Service in deploy/base)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/, when this runs as a script
from bench.process import load_gateway  # noqa: E402
from embedserve.settings import Settings  # noqa: E402

BASE = ROOT / "deploy" / "base"
OUTPUT = BASE / "envoy" / "envoy.yaml"
# Where the embedserve-envoy image keeps the files that envoy.yaml references (the descriptor set,
# the Lua filter, the docs): the Dockerfile's proto stage renders into it. The ConfigMap holds
# envoy.yaml alone, since those files together are over a ConfigMap's 1 MiB.
IMAGE_CONFIG_DIR = "/etc/envoy"
LISTEN = "0.0.0.0:8080"  # deploy/base/envoy/deployment.yaml's container port
# Envoy's admin API, on the pod's loopback; fixed, where write_config would pick a free port, so
# that every render is the same.
ADMIN_PORT = 9901
HEADER = "# Written by tools/render_k8s_envoy.py from envoy/envoy.yaml: do not edit, run it again.\n"


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def upstreams() -> tuple[str, str]:
    """The server's gRPC and metrics addresses as Envoy reaches them: the headless Service's DNS
    name in the base's namespace, at the Service's `grpc` and `metrics` ports."""
    namespace = _load(BASE / "kustomization.yaml")["namespace"]
    service = _load(BASE / "server" / "service-headless.yaml")
    ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}
    host = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    return f"{host}:{ports['grpc']}", f"{host}:{ports['metrics']}"


def write(workdir: Path) -> Path:
    """Writes the config folder into `workdir`, its paths pointing there (as `envoy --mode
    validate` wants them); returns its envoy.yaml. The body limit is the server's default
    MAX_MESSAGE_BYTES, which the manifests leave as it is."""
    gateway = load_gateway()
    grpc_upstream, metrics_upstream = upstreams()
    return gateway.write_config(
        workdir, LISTEN, grpc_upstream, Settings().max_message_bytes, metrics_upstream, admin_port=ADMIN_PORT
    )


def render() -> str:
    """envoy.yaml for the manifests, its paths those of the image's config folder."""
    with tempfile.TemporaryDirectory(prefix="embedserve-k8s-envoy-") as workdir:
        return HEADER + write(Path(workdir)).read_text().replace(workdir, IMAGE_CONFIG_DIR)


def main() -> None:
    """Writes OUTPUT."""
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
