"""The Grafana dashboard (cluster/grafana-dashboard.json) queries only what tokenline exports,
under the names a scrape of Ray's metrics agent shows, and shows every exported metric."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from services.metrics import catalog

DASHBOARD = Path(__file__).resolve().parent.parent / "cluster" / "grafana-dashboard.json"
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")  # metric names, functions, labels alike
_APP_PREFIX = catalog.SCRAPE_PREFIX + "tokenline"


def _queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and the templating variables' queries."""
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def _series(query: str) -> set[str]:
    return {name for name in _IDENTIFIER.findall(query) if name.startswith(_APP_PREFIX)}


def test_dashboard_parses_and_every_panel_queries_tokenline() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["panels"], "no panels"
    for panel in dashboard["panels"]:
        exprs = [target["expr"] for target in panel["targets"]]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            assert _series(expr), f"panel {panel['title']!r} queries no tokenline metric: {expr}"


def test_dashboard_queries_only_exported_names() -> None:
    queried = set().union(*map(_series, _queries(json.loads(DASHBOARD.read_text()))))
    unknown = queried - catalog.scrape_names()
    assert not unknown, f"the dashboard queries names tokenline does not export: {sorted(unknown)}"


def test_dashboard_shows_every_exported_metric() -> None:
    queried = set().union(*map(_series, _queries(json.loads(DASHBOARD.read_text()))))
    shown = {spec.name for spec in catalog.ALL_METRICS if spec.series_names & queried}
    missing = {spec.name for spec in catalog.ALL_METRICS} - shown
    assert not missing, f"no panel shows {sorted(missing)}"
