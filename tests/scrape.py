"""A Prometheus scrape, parsed with prometheus_client's own parser, read by sample name and labels."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families


class Scrape:
    """The metric families of one scrape of `url`, which must answer 200 in Prometheus's text format."""

    def __init__(self, url: str) -> None:
        response = httpx.get(url, timeout=30)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain"), response.headers
        self.text = response.text
        self.families = {family.name: family for family in text_string_to_metric_families(self.text)}
        # The names as exposed, which Prometheus stores: the parser names a counter's samples
        # `<family>_total` even where the exposition (Envoy's) has no `_total`.
        self.exposed = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)", self.text, re.MULTILINE))

    def type_of(self, family: str) -> str:
        """The family's type (counter, gauge, histogram), asserting that the scrape has it."""
        assert family in self.families, f"{family} not in {sorted(self.families)}"
        return self.families[family].type

    def value(self, sample: str, **labels: str) -> float:
        """The sum of the samples named `sample` whose labels include `labels`; 0 when none does."""
        return sum(
            s.value
            for family in self.families.values()
            for s in family.samples
            if s.name == sample and all(s.labels.get(k, "") == v for k, v in labels.items())
        )

    def label_sets(self, sample: str) -> list[dict[str, str]]:
        """The labels of every sample named `sample`."""
        return [dict(s.labels) for family in self.families.values() for s in family.samples if s.name == sample]
