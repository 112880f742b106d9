"""The Grafana dashboard (deploy/grafana/sealift-migrations.json) names only metrics the agent exports.

Every PromQL expression in it (panel targets and the template variable's
query) is reduced to the metric names it selects; each must be a series of
a family in the agent's registry, built as the agent builds it (its own
metrics and the monitor's; tests/agent/test_metrics.py scrapes a real
agent and checks its text with promtool).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from sealift.agent.metrics import AgentMetrics
from sealift.monitor.service import MonitorConfig, MonitorService

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "sealift-migrations.json"

# PromQL words that are not metric names (functions are recognised by the "(" that follows them).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless"}
# The series a family of each type exposes (prometheus-client, text format).
SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("_sum", "_count", "_created"),
    "gauge": ("",),
    "info": ("_info",),
}


def expressions(node: object) -> Iterator[str]:
    """Every PromQL string in the dashboard: targets' `expr`, template variables' `definition`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield value
            else:
                yield from expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from expressions(item)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (a small PromQL reader, enough for dashboards)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    text = re.sub(r"\$\{?\w+\}?", "", text)  # Grafana variables ($__rate_interval, ${instance})
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    text = re.sub(r"\blabel_values\s*\(\s*([a-zA-Z_:][\w:]*)\s*,[^)]*\)", r"\1", text)  # Grafana's label_values
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word in KEYWORDS or word in ("inf", "nan", "Inf", "NaN"):
            continue
        names.add(word)
    return names


def exported_series(families: dict[str, str]) -> set[str]:
    """Every series name the families expose: a histogram's _bucket/_sum/_count, a counter's _total."""
    return {name + suffix for name, kind in families.items() for suffix in SUFFIXES.get(kind, ("",))}


def agent_families() -> dict[str, str]:
    """The families of a registry built as the agent builds it (agent/daemon.py)."""
    metrics = AgentMetrics()
    MonitorService("host-x", MonitorConfig(enabled=False), [], lambda kind, **fields: None, registry=metrics.registry)
    return {family.name: family.type for family in metrics.registry.collect()}


def test_the_reader_finds_metric_names_and_only_them() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(sealift_migration_downtime_seconds_bucket{instance=~"$instance",'
        'role="source"}[$__rate_interval]))) / on (job) group_left sum(x_total offset 5m) > bool 0'
    )
    assert metric_names(expr) == {"sealift_migration_downtime_seconds_bucket", "x_total"}
    assert metric_names("label_values(sealift_migrations_started_total, instance)") == {
        "sealift_migrations_started_total"
    }


def test_suffixes_are_stripped_only_where_the_family_has_them() -> None:
    series = exported_series({"a_seconds": "histogram", "b": "counter", "c_count": "gauge"})
    assert {"a_seconds_bucket", "a_seconds_sum", "a_seconds_count", "b_total", "c_count"} <= series
    assert "a_seconds" not in series and "b" not in series and "c" not in series and "c_count_sum" not in series


def test_every_dashboard_expression_names_a_metric_the_agent_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = list(expressions(dashboard))
    assert len(exprs) >= 20, exprs
    exported = exported_series(agent_families())
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} names {sorted(unknown)}, which the agent does not export"


@pytest.mark.parametrize(
    "title",
    [
        "In flight",
        "Progress",
        "Success rate (outgoing, last hour)",
        "Downtime",
        "Total time",
        "Bytes sent per transport",
    ],
)
def test_the_dashboard_has_the_panels_the_issue_asks_for(title: str) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert title in [panel["title"] for panel in dashboard["panels"]]
