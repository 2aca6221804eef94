"""The Grafana dashboard's queries and the metric names they use, parsed with a real PromQL parser.

Used by tests/deploy/test_deploy.py (the dashboard file) and by the live-scrape tests of a running remix-serve
(tests/server/test_server.py), so that the dashboard cannot drift from what the server exports.
"""

from __future__ import annotations

import json
import re

import promql_parser

from tests.helpers import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "remix-dashboard.json"

_HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Grafana's interval variables are not PromQL; they are replaced by a duration before parsing.
GRAFANA_INTERVALS = re.compile(r"\$(__rate_interval|__interval|__range)\b|\$\{(__rate_interval|__interval|__range)\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<expr>.*),\s*(?P<label>[a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((?P<expr>.*)\)\s*$", re.S)


def _base_metric_name(name: str) -> str:
    for suffix in _HISTOGRAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def promql_metric_names(expr: str) -> set[str]:
    """Metric names selected by one PromQL expression (parsed, not pattern-matched), histogram suffixes removed.

    Accepts Grafana's `$__rate_interval`-style range variables and `$var` inside label matcher values.
    Raises ValueError on anything that is not valid PromQL.
    """
    ast = promql_parser.parse(GRAFANA_INTERVALS.sub("5m", expr))
    names: set[str] = set()

    def visit(node: object) -> bool:
        if isinstance(node, promql_parser.VectorSelector):
            name = node.name
            if name is None:  # {__name__="..."}
                equal = [m.value for m in node.matchers.matchers if m.name == "__name__" and "Equal" in str(m.op)]
                if len(equal) != 1:
                    raise ValueError(f"selector without a single metric name in {expr!r}")
                name = equal[0]
            names.add(_base_metric_name(name))
        return True

    promql_parser.walk(ast, visit)
    return names


def _variable_query(var: dict) -> str | None:
    query = var.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    return query or None


def dashboard_targets(dashboard: dict | None = None) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) of every panel target, rows' nested panels included."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())

    def panels(items: list[dict]):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    return [
        (p.get("title", ""), target["expr"])
        for p in panels(dashboard.get("panels", []))
        for target in p.get("targets", [])
        if target.get("expr")
    ]


def dashboard_variables(dashboard: dict | None = None) -> list[tuple[str, str, str | None]]:
    """(name, PromQL expression, label) of each query variable: `label_values(expr, label)` gives the label,
    `query_result(expr)` gives None."""
    if dashboard is None:
        dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = _variable_query(var)
        if query is None:
            continue
        match = _LABEL_VALUES.match(query) or _QUERY_RESULT.match(query)
        if match is None:
            raise ValueError(f"variable {var.get('name')!r}: unsupported query {query!r}")
        out.append((var.get("name", ""), match["expr"], match.groupdict().get("label")))
    return out


def dashboard_queries(dashboard: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard: panel targets (rows' nested panels included) and the
    `label_values(...)` / `query_result(...)` expressions of its query variables."""
    targets = [expr for _, expr in dashboard_targets(dashboard)]
    return targets + [expr for _, expr, _ in dashboard_variables(dashboard)]


def dashboard_metric_names(dashboard: dict | None = None) -> set[str]:
    """Metric names that the dashboard's queries use, as the server's /metrics must export them.

    Histogram series (`_bucket`, `_sum`, `_count`) map to the histogram's name; counters keep `_total`.
    """
    names: set[str] = set()
    for expr in dashboard_queries(dashboard):
        names |= promql_metric_names(expr)
    return names


def exported_metric_names(exposition: str) -> set[str]:
    """Metric names in a Prometheus text exposition (a /metrics body), in dashboard_metric_names()'s form:
    histograms and summaries by their family name, every other sample by its own name (counters with _total),
    `_created` samples left out."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            if family.type in ("histogram", "gaugehistogram", "summary"):
                names.add(family.name)
            else:
                names.add(sample.name)
    return names


# Metrics only a multi-checkpoint (pool mode) server exports; a single-checkpoint server has no pool.
POOL_METRIC_PREFIX = "remix_pool_"


def is_pool_query(expr: str) -> bool:
    """True for a query that selects only pool metrics (its panel is empty on a single-checkpoint server)."""
    names = promql_metric_names(expr)
    return bool(names) and all(n.startswith(POOL_METRIC_PREFIX) for n in names)


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())
