"""Metrics through real Envoy on its REST port: GET /metrics is the server's (from its
METRICS_PORT), GET /metrics/envoy is Envoy's own (its admin API's /stats/prometheus), failures are
OpenAI-style errors, and the Grafana dashboard queries only metrics that these scrapes have."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from embedserve.settings import DEFAULT_DENSE_MODEL
from tests.conftest import RunningServer
from tests.e2e.conftest import ROOT, Gateway, free_port
from tests.scrape import Scrape

CREATE_EMBEDDINGS = "embedserve.v1.OpenAIService/CreateEmbeddings"
DASHBOARD = ROOT / "deploy" / "grafana" / "embedserve.json"
# Envoy's requests on the REST and gRPC listener (its stat_prefix) answered 2xx.
ENVOY_2XX = {"envoy_http_conn_manager_prefix": "embedserve", "envoy_response_code_class": "2"}


@pytest.fixture(scope="module")
def http(gateway: Gateway) -> httpx.Client:
    return httpx.Client(base_url=gateway.base_url, timeout=60)


def test_metrics_through_envoy_are_the_servers_and_count_rest_calls_by_route_model_and_code(
    http: httpx.Client, gateway: Gateway, server: RunningServer
) -> None:
    before = Scrape(f"{gateway.base_url}/metrics")
    assert http.post("/v1/embeddings", json={"model": DEFAULT_DENSE_MODEL, "input": ["a", "b"]}).status_code == 200
    missing = http.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"})
    after = Scrape(f"{gateway.base_url}/metrics")
    assert missing.status_code == 404

    def moved(sample: str, **labels: str) -> float:
        return after.value(sample, **labels) - before.value(sample, **labels)

    ok = {"rpc": CREATE_EMBEDDINGS, "model": DEFAULT_DENSE_MODEL, "code": "OK"}
    assert moved("embedserve_requests_total", **ok) == 1
    assert moved("embedserve_requests_total", rpc=CREATE_EMBEDDINGS, model="", code="NOT_FOUND") == 1
    assert moved("embedserve_batch_inputs_sum", model=DEFAULT_DENSE_MODEL) == 2
    # The very same registry as on the server's own port.
    direct = Scrape(f"http://{server.metrics_address}/metrics")
    assert set(direct.families) == set(after.families)
    assert direct.value("embedserve_requests_total", **ok) == after.value("embedserve_requests_total", **ok)


def test_envoys_own_stats_are_at_metrics_envoy_and_its_admin_api_is_not_on_the_rest_port(
    http: httpx.Client, gateway: Gateway
) -> None:
    before = Scrape(f"{gateway.base_url}/metrics/envoy")
    assert before.type_of("envoy_http_downstream_rq_xx") == "counter"
    assert before.type_of("envoy_cluster_upstream_rq_time") == "histogram"
    assert http.get("/v1/models").status_code == 200
    after = Scrape(f"{gateway.base_url}/metrics/envoy")
    # The scrape before and this GET /v1/models, at least (health checks are not on the listener).
    # (Envoy exposes envoy_http_downstream_rq_xx; the parser names its samples `_total`.)
    assert (
        after.value("envoy_http_downstream_rq_xx_total", **ENVOY_2XX)
        - before.value("envoy_http_downstream_rq_xx_total", **ENVOY_2XX)
        >= 2
    )
    for path in ("/stats", "/quitquitquit", "/config_dump", "/stats/prometheus"):
        refused = http.get(path)
        assert refused.status_code == 404, path
        assert refused.json()["error"]["code"] == "not_found"
    assert http.post("/metrics/envoy").status_code != 200
    assert http.get("/health").status_code == 200  # Envoy still up after all of that


@pytest.mark.parametrize("metrics", ["nothing-listens", ""])
def test_metrics_that_envoy_cannot_fetch_are_an_openai_error(server: RunningServer, metrics: str) -> None:
    address = f"127.0.0.1:{free_port()}" if metrics else ""
    with Gateway(server.address, metrics=address) as orphan:
        response = httpx.get(f"{orphan.base_url}/metrics", timeout=30)
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "unavailable")
    assert error["message"]


def dashboard_metrics() -> set[str]:
    """The metric names the dashboard's queries read: every name in a PromQL expression once the
    label matchers ({...}), grouping (by (...)) and ranges ([...]) are taken out."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    queries += [variable["definition"] for variable in dashboard["templating"]["list"] if "definition" in variable]
    names: set[str] = set()
    for query in queries:
        bare = re.sub(r"\{[^}]*\}|\bby \([^)]*\)|\[[^]]*\]", "", query)
        names |= set(re.findall(r"\b(?:embedserve|envoy|process)_[a-z0-9_]+\b", bare))
    return names


def test_the_grafana_dashboard_queries_only_metrics_that_the_scrapes_have(http: httpx.Client, gateway: Gateway) -> None:
    assert http.post("/v1/embeddings", json={"input": "so that every labelled family has samples"}).status_code == 200
    exposed = {name for path in ("/metrics", "/metrics/envoy") for name in Scrape(f"{gateway.base_url}{path}").exposed}
    wanted = dashboard_metrics()
    assert {"embedserve_requests_total", "embedserve_queue_inputs", "envoy_http_downstream_rq_xx"} <= wanted
    assert wanted - exposed == set()
