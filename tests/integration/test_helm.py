"""The Helm chart: `helm lint`, `helm template` (default values and existingSecret), every
rendered manifest validated against the Kubernetes schemas (kubernetes-validate), CRD objects
checked by hand, and the chart's copies of rules, dashboard and policies equal to the sources.

Over 500 lines because one rendering of the chart feeds every check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.kme_pki import DEFAULT_KME_IDS
from tests.support.deploy import check_cli, is_settings_env

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "fleetbus"
KUBERNETES_VERSION = "1.34.0"
#: The Prometheus Operator's kinds, as a cluster that has its CRDs announces them.
OPERATOR_APIS = (
    "monitoring.coreos.com/v1/ServiceMonitor",
    "monitoring.coreos.com/v1/PrometheusRule",
)
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CRD_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
#: Chart file -> the source it must equal byte for byte (Helm reads only files in the chart).
CHART_COPIES = {
    "files/grafana/fleetbus.json": "observability/grafana/fleetbus.json",
    "files/prometheus/rules.yml": "observability/prometheus/rules.yml",
}


def _missing(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def helm_version() -> str:
    """The helm version scripts/install-tools.sh builds."""
    script = (ROOT / "scripts" / "install-tools.sh").read_text()
    match = re.search(r'HELM_VERSION="\$\{FLEETBUS_HELM_VERSION:-(v[0-9.]+)\}"', script)
    assert match is not None
    return match.group(1)


def helm_binary() -> str:
    cache = Path(os.environ.get("FLEETBUS_CACHE", Path.home() / ".cache" / "fleetbus"))
    # The stamped build of install-tools.sh first: an older checkout's script may have pointed
    # the bin/helm link back at an unstamped one.
    stamped = cache / "bin" / f"helm-{helm_version()}-stamped"
    for candidate in (stamped, shutil.which("helm"), cache / "bin" / "helm"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    _missing("helm not found: run ./scripts/install-tools.sh (go install helm.sh/helm/v3)")
    raise AssertionError("unreachable")


def validator() -> Callable[..., str]:
    try:
        import kubernetes_validate
    except ImportError:
        _missing("kubernetes-validate not installed: pip install kubernetes-validate (dev extra)")
        raise AssertionError("unreachable") from None
    validate: Callable[..., str] = kubernetes_validate.validate
    return validate


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def _files(values: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{values}.{name.replace('.', chr(92) + '.')}=eA==" for name in names)


#: The files each chart-created Secret must hold (the render fails without them).
KEY_FILES = _files("secrets.keys", "root.pub", "directory.cbor", "bus-sealer.key")
SECRET_FILES = (
    *KEY_FILES,
    *_files("secrets.pki", "ca.pem", "sae-dispatch-hub.pem", "sae-dispatch-hub.key"),
    *_files("kafkaTls.files", "ca.pem", "tls.crt", "tls.key"),
    *_files("kme.pki", "ca.pem", "kme-a.pem", "kme-a.key", "kme-b.pem", "kme-b.key"),
)


def render(
    *sets: str, base: tuple[str, ...] = SECRET_FILES, apis: tuple[str, ...] = OPERATOR_APIS
) -> list[dict[str, Any]]:
    flags = [f for s in (*base, *sets) for f in ("--set", s)]
    flags += [f for api in apis for f in ("--api-versions", api)]
    result = helm(
        "template", "fb", str(CHART), "--namespace", "fleet",
        "--kube-version", KUBERNETES_VERSION, *flags,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in by_kind(docs, kind) if d["metadata"]["name"] == name]
    return doc


def validate_all(docs: list[dict[str, Any]]) -> None:
    validate = validator()
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            check_crd(doc)
            continue
        validate(doc, KUBERNETES_VERSION, strict=True)


def check_crd(doc: dict[str, Any]) -> None:
    """No schema for CRDs in kubernetes-validate: check the fields the operator requires."""
    assert doc["metadata"]["name"]
    spec = doc["spec"]
    if doc["kind"] == "ServiceMonitor":
        assert spec["selector"]["matchLabels"]
        assert spec["endpoints"]
        for endpoint in spec["endpoints"]:
            assert endpoint["port"] == "metrics"
            assert endpoint["path"] == "/metrics"
    else:
        assert spec["groups"]
        for group in spec["groups"]:
            assert group["name"]
            for rule in group["rules"]:
                assert rule["expr"]
                assert ("alert" in rule) != ("record" in rule)


# -- tests ------------------------------------------------------------------------------------


def test_helm_lint() -> None:
    result = helm("lint", str(CHART), "--strict", "--kube-version", KUBERNETES_VERSION)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


def test_default_values_render_valid_manifests() -> None:
    docs = render()
    kinds = {d["kind"] for d in docs}
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "ServiceAccount",
        "ServiceMonitor",
        "PrometheusRule",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Pod",  # the helm test hook
    }
    validate_all(docs)
    assert {d["metadata"]["name"] for d in by_kind(docs, "Deployment")} == {
        "fb-fleetbus-worker",
        "fb-fleetbus-kme",
    }


def test_validation_catches_a_broken_manifest() -> None:
    docs = render()
    deployment = one(docs, "Deployment", "fb-fleetbus-worker")
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(Exception, match="containerPort"):
        validate_all([deployment])


def test_existing_secret_is_used_and_not_rendered() -> None:
    docs = render(
        "secrets.existingSecret=fleet-keys",
        "secrets.existingPkiSecret=fleet-pki",
        "kafkaTls.existingSecret=fleet-kafka-tls",
        "kme.existingPkiSecret=fleet-kme-pki",
        base=(),
    )
    validate_all(docs)
    assert by_kind(docs, "Secret") == []
    kme = one(docs, "Deployment", "fb-fleetbus-kme")["spec"]["template"]["spec"]
    assert kme["volumes"][0]["secret"]["secretName"] == "fleet-kme-pki"
    spec = one(docs, "Deployment", "fb-fleetbus-worker")["spec"]["template"]["spec"]
    secrets = {v["name"]: v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v}
    assert secrets == {"keys": "fleet-keys", "pki": "fleet-pki", "kafka-tls": "fleet-kafka-tls"}


def test_key_material_from_values_lands_in_the_secret_only() -> None:
    docs = render("secrets.keys.bus-sealer\\.key=c2VjcmV0LWtleQ==")
    secret = one(docs, "Secret", "fb-fleetbus-keys")
    assert secret["data"]["bus-sealer.key"] == "c2VjcmV0LWtleQ=="
    others = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    assert "c2VjcmV0LWtleQ" not in others


def test_values_schema_rejects_bad_values() -> None:
    result = helm(
        "template", "fb", str(CHART), "--kube-version", KUBERNETES_VERSION,
        "--set", "worker.metricsPort=not-a-port",
    )  # fmt: skip
    assert result.returncode != 0
    assert "metricsPort" in result.stderr


def test_pods_are_locked_down() -> None:
    docs = render()
    for deployment in by_kind(docs, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"]:
            name = f"{deployment['metadata']['name']}/{container['name']}"
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert container["resources"]["requests"], name
            assert container["resources"]["limits"], name
            assert container["livenessProbe"], name
            assert container["readinessProbe"], name


def test_every_settings_env_var_the_chart_sets_is_a_field() -> None:
    docs = render("worker.otlpEndpoint=http://otel:4318")
    names: set[str] = set(one(docs, "ConfigMap", "fb-fleetbus-settings")["data"])
    for deployment in by_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            names |= {e["name"] for e in container.get("env", [])}
    fleetbus = {n for n in names if n.startswith("FLEETBUS_")}
    assert len(fleetbus) >= 10
    bad = sorted(n for n in fleetbus if not is_settings_env(n))
    assert bad == []
    settings = one(docs, "ConfigMap", "fb-fleetbus-settings")["data"]
    worker = one(docs, "Deployment", "fb-fleetbus-worker")["spec"]["template"]["spec"]
    (port,) = worker["containers"][0]["ports"]
    assert int(settings["FLEETBUS_METRICS_PORT"]) == port["containerPort"]
    assert settings["FLEETBUS_METRICS_BIND"] == "0.0.0.0"


def test_container_commands_are_real_cli_commands() -> None:
    docs = render()
    for deployment in by_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("fleetbus:"):
                check_cli(container["args"])


def test_prometheus_rule_equals_the_rules_file() -> None:
    docs = render()
    rule = one(docs, "PrometheusRule", "fb-fleetbus")
    source = yaml.safe_load((ROOT / "observability/prometheus/rules.yml").read_text())
    assert rule["spec"] == source
    # Alert templates reach the cluster unrendered by Helm.
    assert "{{ $labels.profile }}" in yaml.safe_dump(rule)


def test_dashboard_configmap_equals_the_dashboard() -> None:
    docs = render()
    configmap = one(docs, "ConfigMap", "fb-fleetbus-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = (ROOT / "observability/grafana/fleetbus.json").read_text()
    assert json.loads(configmap["data"]["fleetbus.json"]) == json.loads(source)


def test_policies_configmap_carries_every_policy() -> None:
    docs = render()
    data = one(docs, "ConfigMap", "fb-fleetbus-policies")["data"]
    sources = {p.name: p.read_text() for p in (ROOT / "processors/policies").glob("*.cedar")}
    assert sources
    assert {k: v.rstrip("\n") for k, v in data.items()} == {
        k: v.rstrip("\n") for k, v in sources.items()
    }


def test_chart_copies_equal_their_sources_byte_for_byte() -> None:
    """Helm can read only files inside the chart: its copies must not drift from the sources.

    Refresh with: cp processors/policies/*.cedar helm/fleetbus/files/policies/ (and the same
    for the files in CHART_COPIES)."""
    pairs = dict(CHART_COPIES)
    chart_policies = {p.name for p in (CHART / "files/policies").glob("*.cedar")}
    source_policies = {p.name for p in (ROOT / "processors/policies").glob("*.cedar")}
    assert chart_policies == source_policies
    for name in source_policies:
        pairs[f"files/policies/{name}"] = f"processors/policies/{name}"
    for copy, source in pairs.items():
        assert (CHART / copy).read_bytes() == (ROOT / source).read_bytes(), f"{copy} drifted"


def _arg(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_kme_serves_metrics_itself_on_the_port_service_and_monitor_use() -> None:
    docs = render("kme.metricsPort=9555")
    pod = one(docs, "Deployment", "fb-fleetbus-kme")["spec"]["template"]["spec"]
    (kme,) = pod["containers"]  # no metrics sidecar any more
    assert kme["image"].startswith("fleetbus:")
    args = kme["args"]
    assert _arg(args, "--metrics-host") == "0.0.0.0"
    assert _arg(args, "--metrics-port") == "9555"
    assert _arg(args, "--admin-port") != "9555"  # the switches stay on loopback
    ports = {p["name"]: p["containerPort"] for p in kme["ports"]}
    assert ports["metrics"] == 9555
    assert kme["readinessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    service = one(docs, "Service", "fb-fleetbus-kme")
    (metrics,) = [p for p in service["spec"]["ports"] if p["name"] == "metrics"]
    assert (metrics["port"], metrics["targetPort"]) == (9555, "metrics")
    monitor = one(docs, "ServiceMonitor", "fb-fleetbus-kme")
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert "nginx" not in yaml.safe_dump_all(docs)


def test_kme_state_dir_is_a_volume_emptydir_or_the_claim_given() -> None:
    for sets, expected in [
        ((), {"emptyDir": {}}),
        (
            ("kme.persistence.existingClaim=kme-pool",),
            {"persistentVolumeClaim": {"claimName": "kme-pool"}},
        ),
    ]:
        docs = render(*sets)
        validate_all(docs)
        pod = one(docs, "Deployment", "fb-fleetbus-kme")["spec"]["template"]["spec"]
        (kme,) = pod["containers"]
        state_dir = _arg(kme["args"], "--state-dir")
        (mount,) = [m for m in kme["volumeMounts"] if m["mountPath"] == state_dir]
        assert not mount.get("readOnly", False)
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert {k: v for k, v in volume.items() if k != "name"} == expected


def test_worker_expects_the_kme_id_of_the_bundled_kme_a() -> None:
    # ETSI 014 clause 5.1: the worker checks the KME ID in the KME's certificate; the bundled
    # simulator's KME-A (the port the URL names) is `kme certs`'s default KME-A.
    settings = one(render(), "ConfigMap", "fb-fleetbus-settings")["data"]
    assert settings["FLEETBUS_QKD_KME_URL"].endswith(":8443")
    assert settings["FLEETBUS_QKD_KME_ID"] == DEFAULT_KME_IDS[0]
    own = one(render("settings.qkd_kme_id=depot-kme"), "ConfigMap", "fb-fleetbus-settings")
    assert own["data"]["FLEETBUS_QKD_KME_ID"] == "depot-kme"


def test_kme_can_be_disabled() -> None:
    docs = render("kme.enabled=false")
    validate_all(docs)
    assert {d["metadata"]["name"] for d in by_kind(docs, "Deployment")} == {"fb-fleetbus-worker"}
    assert len(by_kind(docs, "ServiceMonitor")) == 1


def test_worker_connects_to_kafka_over_mutual_tls_by_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = render("kafkaTls.files.ca\\.pem=Y2E=")
    validate_all(docs)
    settings_env = one(docs, "ConfigMap", "fb-fleetbus-settings")["data"]
    for name, value in settings_env.items():
        monkeypatch.setenv(name, value)
    settings = FleetbusSettings()
    client = settings.kafka_client_config()
    assert client["security_protocol"] == "SSL"
    assert client["ssl_check_hostname"] is True
    files = {client["ssl_cafile"], client["ssl_certfile"], client["ssl_keyfile"]}
    assert {Path(f).parent for f in files} == {Path("/kafka-tls")}
    spec = one(docs, "Deployment", "fb-fleetbus-worker")["spec"]["template"]["spec"]
    (mount,) = [m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "kafka-tls"]
    assert mount == {"name": "kafka-tls", "mountPath": "/kafka-tls", "readOnly": True}
    (volume,) = [v for v in spec["volumes"] if v["name"] == "kafka-tls"]
    assert volume["secret"]["secretName"] == "fb-fleetbus-kafka-tls"
    assert volume["secret"]["defaultMode"] == 0o400
    assert one(docs, "Secret", "fb-fleetbus-kafka-tls")["data"]["ca.pem"] == "Y2E="


def test_kafka_tls_can_be_disabled_for_a_plaintext_dev_cluster() -> None:
    docs = render("kafkaTls.enabled=false")
    validate_all(docs)
    settings_env = one(docs, "ConfigMap", "fb-fleetbus-settings")["data"]
    assert not any(name.startswith("FLEETBUS_KAFKA_SSL") for name in settings_env)
    assert "FLEETBUS_KAFKA_SECURITY_PROTOCOL" not in settings_env
    spec = one(docs, "Deployment", "fb-fleetbus-worker")["spec"]["template"]["spec"]
    assert "kafka-tls" not in {v["name"] for v in spec["volumes"]}
    assert "fb-fleetbus-kafka-tls" not in {d["metadata"]["name"] for d in by_kind(docs, "Secret")}


# -- a misconfigured deploy must not look healthy ------------------------------------------


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ((), "secrets.keys lacks root.pub, directory.cbor, bus-sealer.key"),
        (
            _files("secrets.keys", "directory.cbor", "bus-sealer.key"),
            "secrets.keys lacks root.pub (or set secrets.existingSecret",
        ),
        (KEY_FILES, "secrets.pki lacks ca.pem, sae-dispatch-hub.pem, sae-dispatch-hub.key"),
        (
            (*KEY_FILES, "secrets.existingPkiSecret=p"),
            "kafkaTls.files lacks ca.pem, tls.crt, tls.key",
        ),
        (
            (*KEY_FILES, "secrets.existingPkiSecret=p", "kafkaTls.existingSecret=t"),
            "kme.pki lacks ca.pem, kme-a.pem, kme-a.key, kme-b.pem, kme-b.key (or set "
            "kme.existingPkiSecret",
        ),
    ],
)
def test_a_secret_the_chart_creates_without_its_files_fails_the_render(
    sets: tuple[str, ...], message: str
) -> None:
    flags = [f for s in sets for f in ("--set", s)]
    result = helm("template", "fb", str(CHART), "--kube-version", KUBERNETES_VERSION, *flags)
    assert result.returncode != 0
    assert message in result.stderr


def test_the_kme_pki_secret_the_kme_mounts_is_rendered() -> None:
    docs = render()
    kme = one(docs, "Deployment", "fb-fleetbus-kme")["spec"]["template"]["spec"]
    (volume,) = [v for v in kme["volumes"] if v["name"] == "pki"]
    secret = one(docs, "Secret", volume["secret"]["secretName"])
    assert set(secret["data"]) == {"ca.pem", "kme-a.pem", "kme-a.key", "kme-b.pem", "kme-b.key"}


def test_a_changed_key_in_a_rendered_secret_rolls_the_pods() -> None:
    def checksums(*sets: str) -> dict[str, str]:
        docs = render(*sets)
        return {
            d["metadata"]["name"]: d["spec"]["template"]["metadata"]["annotations"][
                "checksum/secrets"
            ]
            for d in by_kind(docs, "Deployment")
        }

    before = checksums()
    after = checksums("secrets.keys.bus-sealer\\.key=cm90YXRlZA==")
    assert before.keys() == after.keys() == {"fb-fleetbus-worker", "fb-fleetbus-kme"}
    assert all(before[name] != after[name] for name in before)


def test_worker_probes_are_liveness_and_readiness_not_metrics() -> None:
    worker = one(render(), "Deployment", "fb-fleetbus-worker")["spec"]["template"]["spec"]
    (container,) = worker["containers"]
    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }


def test_runbook_urls_are_absolute_under_the_chart_value() -> None:
    base = "https://runbooks.acme.example/fleetbus/observability.html"
    rule = one(render(f"monitoring.runbookBaseUrl={base}"), "PrometheusRule", "fb-fleetbus")
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    for alert in alerts:
        assert alert["annotations"]["runbook_url"] == f"{base}#{alert['alert'].lower()}"


# -- chart conventions ---------------------------------------------------------------------


def test_helm_is_stamped_and_renders_without_kube_version() -> None:
    """A `go install` build without helm's ldflags defaults to Kubernetes v1.20.0 and refuses
    the chart's kubeVersion unless --kube-version is given."""
    assert helm("version", "--short").stdout.startswith(helm_version())
    result = helm("template", "fb", str(CHART), *[f for s in SECRET_FILES for f in ("--set", s)])
    assert result.returncode == 0, result.stderr


def _template(*sets: str) -> subprocess.CompletedProcess[str]:
    flags = [f for s in (*SECRET_FILES, *sets) for f in ("--set", s)]
    return helm("template", "fb", str(CHART), "--kube-version", KUBERNETES_VERSION, *flags)


def test_settings_are_checked_against_the_settings_model() -> None:
    typo = _template("settings.kafka_bootstap=kafka:9092")
    assert typo.returncode != 0
    assert "kafka_bootstap" in typo.stderr
    bad_choice = _template("settings.pipeline=maybe")
    assert bad_choice.returncode != 0
    assert "pipeline" in bad_choice.stderr
    # A field the chart sets itself would be a second key of the same name.
    duplicate = _template("settings.keys_dir=/elsewhere")
    assert duplicate.returncode != 0
    assert "keys_dir" in duplicate.stderr


def test_the_settings_configmap_has_no_duplicate_keys() -> None:
    result = _template("settings.qkd_kme_url=https://kme.example:8443", "kafkaTls.enabled=true")
    assert result.returncode == 0, result.stderr
    (configmap,) = [
        doc
        for doc in result.stdout.split("\n---")
        if "# Source: fleetbus/templates/configmap-settings.yaml" in doc
    ]
    keys = re.findall(r"^  (FLEETBUS_\w+):", configmap, re.MULTILINE)
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)
    data = yaml.safe_load(configmap)["data"]
    assert data["FLEETBUS_QKD_KME_URL"] == "https://kme.example:8443"


def test_autoscaler_stays_within_the_partitions() -> None:
    docs = render()
    hpa = one(docs, "HorizontalPodAutoscaler", "fb-fleetbus-worker")["spec"]
    settings = one(docs, "ConfigMap", "fb-fleetbus-settings")["data"]
    assert hpa["minReplicas"] <= hpa["maxReplicas"] <= int(settings["FLEETBUS_PARTITIONS"])
    inverted = _template("worker.autoscaling.minReplicas=4", "worker.autoscaling.maxReplicas=3")
    assert inverted.returncode != 0
    assert "minReplicas (4) > maxReplicas (3)" in inverted.stderr
    idle = _template("worker.autoscaling.maxReplicas=8")
    assert idle.returncode != 0
    assert "maxReplicas (8) > settings.partitions (4)" in idle.stderr
    assert _template("worker.autoscaling.maxReplicas=8", "settings.partitions=8").returncode == 0


def test_the_usual_knobs() -> None:
    docs = render(
        "fullnameOverride=fleet",
        "commonLabels.team=mobility",
        "worker.podLabels.tier=bus",
        "serviceAccount.name=fleet-sa",
        "serviceAccount.annotations.iam\\.example/role=fleet",
        "podSecurityContext.runAsUser=20000",
        "podSecurityContext.runAsNonRoot=true",
        "worker.priorityClassName=high",
        "worker.topologySpreadConstraints[0].maxSkew=1",
        "worker.topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone",
        "worker.topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway",
        "worker.extraVolumes[0].name=ca",
        "worker.extraVolumes[0].configMap.name=corp-ca",
        "worker.extraVolumeMounts[0].name=ca",
        "worker.extraVolumeMounts[0].mountPath=/etc/corp-ca",
        "kme.image.repository=registry.example/kme",
        "kme.image.tag=1.2",
        "kme.nodeSelector.site=depot",
        "kme.tolerations[0].key=dedicated",
        "kme.tolerations[0].operator=Exists",
    )
    validate_all(docs)
    assert all(d["metadata"]["labels"]["team"] == "mobility" for d in docs)
    worker = one(docs, "Deployment", "fleet-worker")["spec"]["template"]
    assert worker["metadata"]["labels"]["tier"] == "bus"
    pod = worker["spec"]
    assert pod["serviceAccountName"] == "fleet-sa"
    assert pod["securityContext"]["runAsUser"] == 20000
    assert pod["priorityClassName"] == "high"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"]["app.kubernetes.io/component"] == "worker"
    assert {"name": "ca", "configMap": {"name": "corp-ca"}} in pod["volumes"]
    assert {"name": "ca", "mountPath": "/etc/corp-ca"} in pod["containers"][0]["volumeMounts"]
    account = one(docs, "ServiceAccount", "fleet-sa")
    assert account["metadata"]["annotations"] == {"iam.example/role": "fleet"}
    assert account["automountServiceAccountToken"] is False
    kme = one(docs, "Deployment", "fleet-kme")["spec"]["template"]["spec"]
    assert kme["containers"][0]["image"] == "registry.example/kme:1.2"
    assert kme["nodeSelector"] == {"site": "depot"}
    assert kme["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    renamed = render("nameOverride=bus")
    assert {d["metadata"]["name"] for d in by_kind(renamed, "Deployment")} == {
        "fb-bus-worker",
        "fb-bus-kme",
    }


def test_operator_objects_render_only_where_the_operator_is() -> None:
    without = render(apis=())
    validate_all(without)
    assert by_kind(without, "ServiceMonitor") == by_kind(without, "PrometheusRule") == []
    with_operator = render()
    assert len(by_kind(with_operator, "ServiceMonitor")) == 2
    assert len(by_kind(with_operator, "PrometheusRule")) == 1


def test_helm_test_hook_asks_the_workers_readiness() -> None:
    (pod,) = by_kind(render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    assert container["command"][-1] == "http://fb-fleetbus-worker:9100/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_notes_render_with_the_release_and_the_readiness_check(tmp_path: Path) -> None:
    # helm renders NOTES.txt only on install (which needs a cluster): render it through a copy
    # of the chart where a ConfigMap carries it.
    chart = tmp_path / "fleetbus"
    shutil.copytree(CHART, chart)
    shutil.copy(chart / "templates" / "NOTES.txt", chart / "files" / "notes.txt")
    (chart / "templates" / "notes-check.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: notes}\n"
        'data:\n  notes: {{ tpl (.Files.Get "files/notes.txt") . | quote }}\n'
    )
    flags = [f for s in SECRET_FILES for f in ("--set", s)]
    result = helm(
        "template", "fb", str(chart), "--kube-version", KUBERNETES_VERSION,
        "--show-only", "templates/notes-check.yaml", *flags,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    assert "deployment/fb-fleetbus-worker" in notes
    assert "/readyz" in notes
    assert "Prometheus Operator's CRDs were not found" in notes


def test_chart_readme_is_shown_by_helm() -> None:
    result = helm("show", "readme", str(CHART))
    assert result.returncode == 0, result.stderr
    for value in ("existingSecret", "runbookBaseUrl", "helm test", "release:"):
        assert value in result.stdout, value
