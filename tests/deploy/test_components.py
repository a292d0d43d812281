"""The optional monitoring components, rendered as a user adds them, and each overlay's memory budget.

Rendered by the real kustomize in kubectl (`kubectl kustomize`): the components are added to a copy of each
overlay exactly as deploy/README.md tells a user to. Without kubectl these tests skip, unless
PGPUSH_REQUIRE_CHECKERS=1 makes that a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("dev", "prod")
COMPONENTS = ("servicemonitor", "prometheusrule")

Resource = dict[str, Any]


def kustomize(directory: Path) -> list[Resource]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        reason = "no kubectl on PATH (its kustomize renders the components)"
        if os.environ.get("PGPUSH_REQUIRE_CHECKERS", "") not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; PGPUSH_REQUIRE_CHECKERS is set")
        pytest.skip(reason)
    proc = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return [r for r in yaml.safe_load_all(proc.stdout) if r]


def with_components(overlay: str, tmp_path: Path) -> list[Resource]:
    """The overlay with both components listed in its kustomization.yaml, as a user would add them."""
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    kustomization = copy / "overlays" / overlay / "kustomization.yaml"
    listed = "".join(f"  - ../../components/{name}\n" for name in COMPONENTS)
    kustomization.write_text(kustomization.read_text() + f"\ncomponents:\n{listed}")
    return kustomize(copy / "overlays" / overlay)


def one(resources: list[Resource], kind: str) -> Resource:
    (found,) = [r for r in resources if r["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_components_are_optional(overlay: str) -> None:
    kinds = {r["kind"] for r in kustomize(DEPLOY / "overlays" / overlay)}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}, (
        "clusters without Prometheus Operator lack the CRDs"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_monitor_scrapes_the_server_pods_metrics(overlay: str, tmp_path: Path) -> None:
    resources = with_components(overlay, tmp_path)
    monitor, service = one(resources, "ServiceMonitor"), one(resources, "Service")
    deployment = one(resources, "Deployment")
    namespace = one(resources, "Namespace")["metadata"]["name"]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"] == namespace
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    (port,) = service["spec"]["ports"]
    assert endpoint["port"] == port["name"]
    assert endpoint["path"] == "/metrics"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert port["targetPort"] in {p["name"] for p in container["ports"]}
    # The pods' annotations say the same, for annotation-based scraping.
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == endpoint["path"]


def documented_metrics() -> dict[str, dict[str, set[str]]]:
    """README.md's "Metrics" table: metric name -> label -> the values it documents (backticked)."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("\n## Metrics", 1)[1].split("\n## ", 1)[0]
    metrics: dict[str, dict[str, set[str]]] = {}
    for row in table.splitlines():
        match = re.match(r"\| `(pgpush_\w+)(?:\{([\w,]+)\})?` \|[^|]*\|(.*)\|", row)
        if match:
            labels = match[2].split(",") if match[2] else []
            values = set(re.findall(r"`([\w]+)`", match[3]))
            metrics[match[1]] = {label: values for label in labels}
    assert len(metrics) > 10, "the README's metrics table moved: update this parser"
    return metrics


def selectors(node: Any) -> list[Any]:
    """Every vector selector in a parsed PromQL expression."""
    import promql_parser

    if isinstance(node, promql_parser.VectorSelector):
        return [node]
    if isinstance(node, list):
        return [found for item in node for found in selectors(item)]
    children = ("lhs", "rhs", "expr", "args", "param", "vector_selector")
    return [found for name in children if hasattr(node, name) for found in selectors(getattr(node, name))]


def series_names(metric: str) -> set[str]:
    """The series a documented metric produces (counters end in _total, histograms add three)."""
    if metric.endswith("_seconds") or metric.endswith("_bytes"):
        return {f"{metric}_bucket", f"{metric}_sum", f"{metric}_count"}
    return {metric}


def test_every_alert_parses_and_selects_only_documented_series(tmp_path: Path) -> None:
    """An alert on a misspelled metric or label value is valid PromQL that never fires."""
    promql_parser = pytest.importorskip(
        "promql_parser", reason="pip install -e '.[test]' brings promql-parser"
    )
    resources = with_components("prod", tmp_path)
    service_name = one(resources, "Service")["metadata"]["name"]
    documented = documented_metrics()
    series = {name: metric for metric in documented for name in series_names(metric)}
    rules = [rule for group in one(resources, "PrometheusRule")["spec"]["groups"] for rule in group["rules"]]
    assert len({rule["alert"] for rule in rules}) == len(rules) >= 5
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        found = selectors(promql_parser.parse(rule["expr"]))
        assert found, rule["alert"]
        for selector in found:
            equal = {
                m.name: m.value for m in selector.matchers.matchers if m.op == promql_parser.MatchOp.Equal
            }
            if selector.name == "up":
                # A ServiceMonitor names its targets' job after the Service.
                assert equal == {"job": service_name}, rule["alert"]
                continue
            assert selector.name in series, f"{rule['alert']}: {selector.name} is not in the README's table"
            labels = documented[series[selector.name]]
            for matcher in selector.matchers.matchers:
                assert matcher.name in labels, f"{rule['alert']}: {selector.name} has no label {matcher.name}"
            for name, value in equal.items():
                assert value in labels[name], f"{rule['alert']}: {name}={value!r} is not a documented value"


def test_the_alerts_deploy_readme_recommends_are_the_rule_s_alerts(tmp_path: Path) -> None:
    rules = one(with_components("prod", tmp_path), "PrometheusRule")["spec"]["groups"]
    alerts = {rule["alert"] for group in rules for rule in group["rules"]}
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("\n## Alerts", 1)[1].split("\n## ", 1)[0]
    assert set(re.findall(r"\| `(Pgpush\w+)` \|", section)) == alerts


# ---- memory ------------------------------------------------------------------------------------------

# deploy/README.md, "Memory": a pod's limit covers the process without streams plus, for every stream it may
# hold, its own cost and the unsent bytes it may queue before it is cut. The idle figures: ~95 MiB measured
# without streams (tests/container checks the image stays under BASELINE), 17 KB per idle stream
# (bench/RESULTS.md), both rounded up.
BASELINE_MIB = 160
PER_STREAM_KIB = 20
UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * UNITS[unit]


def setting(config: dict[str, str], name: str) -> int:
    """The ConfigMap's value, else the service's default."""
    if name in config:
        return int(config[name])
    from pgpush.config import Settings

    field = Settings.model_fields[name.removeprefix("PGPUSH_").lower()]
    return int(field.default)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_memory_limit_holds_every_stream_with_a_full_buffer(overlay: str) -> None:
    resources = kustomize(DEPLOY / "overlays" / overlay)
    config = one(resources, "ConfigMap")["data"]
    (container,) = one(resources, "Deployment")["spec"]["template"]["spec"]["containers"]
    limit = quantity_bytes(container["resources"]["limits"]["memory"])
    streams = setting(config, "PGPUSH_MAX_STREAMS")
    buffer = setting(config, "PGPUSH_STREAM_BUFFER_BYTES")
    worst = BASELINE_MIB * 2**20 + streams * (buffer + PER_STREAM_KIB * 2**10)
    assert worst <= limit, (
        f"{overlay}: {streams} streams need up to {worst / 2**20:.0f} MiB, the limit is {limit}"
    )
    # One message as large as allowed must fit the buffer with room to spare, or it would cut the stream.
    assert buffer >= 2 * setting(config, "PGPUSH_MAX_DATA_BYTES")
