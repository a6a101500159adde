"""Metrics through real Envoy on its REST port: GET /metrics is the server's (from its
METRICS_PORT), GET /metrics/envoy is Envoy's own (its admin API's /stats/prometheus), failures are
OpenAI-style errors, and the Grafana dashboard's PromQL parses and reads only metrics and labels
that these scrapes have."""

from __future__ import annotations

import json
import re

import httpx
import promql_parser
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


# Grafana's variables as Prometheus would see them once Grafana filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$model": ".*", "$job": ".*"}
# Labels Prometheus adds to every sample it scrapes.
TARGET_LABELS = {"instance", "job"}
LABEL_VALUES = re.compile(r"^label_values\((.+), *([a-zA-Z_][a-zA-Z0-9_]*)\)$")


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard (panels' targets, and the selectors of its
    `label_values(selector, label)` variables, with the label as a grouping), variables filled in."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", ())]
    for variable in dashboard["templating"]["list"]:
        if "definition" in variable:
            found = LABEL_VALUES.match(variable["definition"])
            assert found, f"variable {variable['name']}: not label_values(selector, label): {variable['definition']}"
            queries.append(f"count by ({found[2]}) ({found[1]})")
    for name, value in GRAFANA_VARIABLES.items():
        queries = [query.replace(name, value) for query in queries]
    return queries


def exposed_labels(text: str) -> dict[str, set[str]]:
    """Each sample name of a scrape in Prometheus's text format, with the label names it carries."""
    labels: dict[str, set[str]] = {}
    for found in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})? ", text, re.MULTILINE):
        names = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', found[2] or ""))
        labels.setdefault(found[1], set()).update(names)
    return labels


def selectors_and_groupings(query: str) -> tuple[list[tuple[str, set[str]]], list[tuple[str, set[str]]]]:
    """What one query reads, parsed as Prometheus parses it (a syntax error fails the test): each
    vector selector's metric and the labels it matches on, and each aggregation's `by` labels with
    the metrics under it."""
    selectors: list[tuple[str, set[str]]] = []
    groupings: list[tuple[str, set[str]]] = []

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            selectors.append((str(node.name), {m.name for m in node.matchers.matchers}))
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            assert node.modifier.type == promql_parser.AggModifierType.By, f"{query}: `without` hides what it keeps"
            under: list[str] = []
            promql_parser.walk(
                node.expr, lambda n: under.append(str(n.name)) if isinstance(n, promql_parser.VectorSelector) else None
            )
            groupings.extend((metric, set(node.modifier.labels)) for metric in under)

    promql_parser.walk(promql_parser.parse(query), visit)
    return selectors, groupings


def test_the_grafana_dashboard_queries_parse_and_read_only_metrics_and_labels_the_scrapes_have(
    http: httpx.Client, gateway: Gateway
) -> None:
    assert http.post("/v1/embeddings", json={"input": "so that every labelled family has samples"}).status_code == 200
    exposed: dict[str, set[str]] = {}
    for path in ("/metrics", "/metrics/envoy"):
        for name, labels in exposed_labels(Scrape(f"{gateway.base_url}{path}").text).items():
            exposed.setdefault(name, set()).update(labels | TARGET_LABELS)
    queries = dashboard_queries()
    assert len(queries) >= 30
    read: set[str] = set()
    for query in queries:
        selectors, groupings = selectors_and_groupings(query)
        assert selectors, f"{query}: reads no metric"
        for metric, labels in selectors:
            read.add(metric)
            assert metric in exposed, f"{query}: {metric} is in no scrape"
            assert labels <= exposed[metric], f"{query}: {metric} has no label {labels - exposed[metric]}"
        for metric, labels in groupings:
            assert labels <= exposed[metric], f"{query}: grouped by {labels - exposed[metric]}, which {metric} lacks"
        if "histogram_quantile" in query:
            assert all(m.endswith("_bucket") for m, _ in selectors), f"{query}: quantiles of a non-bucket series"
            assert all("le" in labels for _, labels in groupings), f"{query}: a quantile needs the le label kept"
    assert {"embedserve_requests_total", "embedserve_queue_inputs", "envoy_http_downstream_rq_xx"} <= read
