"""docker-compose.yml and the Dockerfile stay valid and in step with the code (no Docker needed).

Checks: the services exist, images are pinned, every FLEETBUS_* variable is a real field of
FleetbusSettings, every `fleetbus ...` command line resolves to a real CLI command with real
options and all its required ones, mounted host files exist, host ports are unique and bound to
loopback, healthchecks are present and depends_on names existing services; key material goes
only where it is needed; the image installs from the dependency lock. The file runs for real
in tests/integration/test_compose_kafka.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from fleetbus.bus.settings import FleetbusSettings
from fleetbus.devtools.kme_pki import DEFAULT_KME_IDS
from tests.support.deploy import (
    DOCKERFILE,
    ROOT,
    check_cli,
    compose,
    environment,
    fleetbus_command_lines,
    is_settings_env,
    kafka_properties,
    services,
    settings_env_names,
)

EXPECTED_SERVICES = {
    "kafka-pki",
    "kafka",
    "kafka-acls",
    "init",
    "kme",
    "worker",
    "fleet",
    "prometheus",
    "grafana",
    "otel-collector",
    "jaeger",
}
#: Services that carry `healthcheck: {disable: true}` on purpose (reason in the compose file).
NO_HEALTHCHECK = {"fleet", "otel-collector"}
#: One-shot services (restart "no"): no healthcheck; others wait for completion instead.
ONE_SHOT = {"init", "kafka-pki", "kafka-acls"}


def _needs_fleet_cli(argv: list[str]) -> None:
    # `fleetbus fleet ...` comes with the dispatch/vehicle SDK's CLI module; until it is in this
    # build, the compose file names it ahead of time.
    if argv and argv[0] == "fleet":
        try:
            import fleetbus.cli.fleet  # noqa: F401
        except ModuleNotFoundError:
            pytest.skip("fleetbus.cli.fleet (fleet simulate) is not in this build yet")


# -- tests ------------------------------------------------------------------------------------


def test_services_present() -> None:
    assert set(services()) == EXPECTED_SERVICES


def test_images_pinned() -> None:
    for name, service in services().items():
        image = service.get("image")
        assert image, f"{name} has no image"
        repo, _, tag = image.rpartition(":")
        assert repo, f"{name}: image {image!r} has no repository"
        assert tag not in {"", "latest"}, f"{name}: image {image!r} not pinned"
    assert services()["kafka"]["image"] == "apache/kafka:4.1.1"


def test_kafka_is_kraft_without_auto_create() -> None:
    env = environment(services()["kafka"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"


def test_settings_env_names_are_derived_from_the_model() -> None:
    exact, _ = settings_env_names()
    assert "FLEETBUS_KAFKA_BOOTSTRAP" in exact
    assert "FLEETBUS_TOPICS__PREFIX" in exact
    assert "FLEETBUS_TOPICS__NOPE" not in exact
    assert not is_settings_env("FLEETBUS_KAFKA_BOOTSTRAPS")


def test_every_fleetbus_env_var_is_a_settings_field() -> None:
    seen = 0
    for name, service in services().items():
        for key in environment(service):
            if key.startswith("FLEETBUS_"):
                seen += 1
                assert is_settings_env(key), f"{name}: {key} is not a FleetbusSettings field"
    assert seen >= 10


def test_worker_metrics_port_is_what_prometheus_scrapes() -> None:
    env = environment(services()["worker"])
    prom = yaml.safe_load((ROOT / "observability/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    assert jobs["fleetbus-worker"]["dns_sd_configs"][0]["port"] == int(env["FLEETBUS_METRICS_PORT"])
    assert env["FLEETBUS_METRICS_BIND"] == "0.0.0.0"
    assert prom["rule_files"] == ["/etc/prometheus/rules.yml"]


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_kme_metrics_listener_is_what_prometheus_scrapes() -> None:
    kme = services()["kme"]
    argv = kme["command"]
    prom = yaml.safe_load((ROOT / "observability/prometheus/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prom["scrape_configs"]}
    (target,) = jobs["kme"]["static_configs"][0]["targets"]
    assert target == f"{kme['hostname']}:{_option(argv, '--metrics-port')}"
    assert _option(argv, "--metrics-host") == "0.0.0.0"
    # The admin switches are not what is scraped, and no sidecar proxies them any more.
    assert _option(argv, "--admin-port") != _option(argv, "--metrics-port")
    assert not any("nginx" in str(s.get("image", "")) for s in services().values())


def test_kme_keeps_its_pool_in_a_named_volume() -> None:
    kme = services()["kme"]
    state_dir = _option(kme["command"], "--state-dir")
    mounts = dict(v.split(":")[:2] for v in kme["volumes"])
    (volume,) = [src for src, dst in mounts.items() if state_dir.startswith(dst.rstrip("/") + "/")]
    assert volume in compose()["volumes"]
    assert "tmpfs" not in kme or not any(state_dir.startswith(t) for t in kme["tmpfs"])


def test_kme_server_certs_name_the_host_workers_dial() -> None:
    host = urlsplit(environment(services()["worker"])["FLEETBUS_QKD_KME_URL"]).hostname
    init = "\n".join(services()["init"]["command"])
    (certs,) = [shlex.split(m) for m in re.findall(r"fleetbus (kme certs .*)", init)]
    sans = [certs[i + 1] for i, arg in enumerate(certs) if arg == "--san"]
    assert host in sans
    assert services()["kme"]["hostname"] == host


def test_workers_expect_the_kme_id_of_the_kme_they_dial() -> None:
    env = environment(services()["worker"])
    port = urlsplit(env["FLEETBUS_QKD_KME_URL"]).port
    init = "\n".join(services()["init"]["command"])
    (certs,) = [shlex.split(m) for m in re.findall(r"fleetbus (kme certs .*)", init)]
    # The worker dials KME-A's port; KME-A's certificate names --kme-a-id (default KME-A).
    assert str(port) == _option(services()["kme"]["command"], "--port-a")
    expected = _option(certs, "--kme-a-id") if "--kme-a-id" in certs else DEFAULT_KME_IDS[0]
    assert env["FLEETBUS_QKD_KME_ID"] == expected


@pytest.mark.parametrize(
    ("service", "argv"),
    fleetbus_command_lines(),
    ids=[f"{s}:{' '.join(a[:2])}" for s, a in fleetbus_command_lines()],
)
def test_fleetbus_commands_exist(service: str, argv: list[str]) -> None:
    _needs_fleet_cli(argv)
    check_cli(argv)


def test_cli_checker_rejects_unknown_commands_and_options() -> None:
    with pytest.raises(AssertionError, match="no command"):
        check_cli(["kme", "explode"])
    with pytest.raises(AssertionError, match="unknown option"):
        check_cli(["kme", "serve", "--warp-drive", "9"])
    with pytest.raises(AssertionError, match="missing required option --keys-dir"):
        check_cli(["fleet", "simulate"])


def test_mounted_host_files_exist() -> None:
    mounts = 0
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                mounts += 1
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
    named = set(compose().get("volumes", {}))
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in named, f"{name}: volume {source} not declared"
    assert mounts >= 5


def test_host_ports_unique() -> None:
    ports: list[str] = []
    for service in services().values():
        for mapping in service.get("ports", []):
            ports.append(str(mapping).rsplit(":", 1)[0])
    assert len(ports) == len(set(ports)), ports


def test_healthchecks_present() -> None:
    for name, service in services().items():
        check = service.get("healthcheck")
        if name in ONE_SHOT:
            assert service.get("restart") == "no"
            continue
        if name in NO_HEALTHCHECK:
            assert check == {"disable": True}, name
            continue
        assert check, f"{name} has no healthcheck"
        assert check.get("test"), f"{name}'s healthcheck has no test"


def test_depends_on_existing_services() -> None:
    names = set(services())
    for name, service in services().items():
        depends = service.get("depends_on", {})
        for dep in depends if isinstance(depends, list) else depends.keys():
            assert dep in names, f"{name} depends on unknown {dep}"
            if isinstance(depends, dict) and depends[dep].get("condition") == "service_healthy":
                assert dep not in NO_HEALTHCHECK | ONE_SHOT, f"{name} waits for {dep}'s health"
        mode = service.get("network_mode", "")
        if mode.startswith("service:"):
            assert mode.split(":", 1)[1] in names


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    grafana = services()["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("."))
    assert mounts["./observability/grafana/fleetbus.json"].startswith("/var/lib/grafana/dashboards")
    provider = yaml.safe_load(
        (ROOT / "observability/grafana/provisioning/dashboards/fleetbus.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_non_root_and_real_cli_command() -> None:
    instructions = _dockerfile_instructions()
    (base,) = [rest for kw, rest in instructions if kw == "FROM"]
    assert base == "python:3.11-slim"
    users = [rest for kw, rest in instructions if kw == "USER"]
    assert users, "no USER"
    assert not users[-1].startswith(("root", "0:", "0 ")), users[-1]
    assert users[-1] != "0"
    assert any(kw == "RUN" and "pip install ." in rest for kw, rest in instructions)
    entrypoint = next(yaml.safe_load(r) for kw, r in instructions if kw == "ENTRYPOINT")
    cmd = next(yaml.safe_load(r) for kw, r in instructions if kw == "CMD")
    assert entrypoint == ["fleetbus"]
    check_cli(cmd)


def test_dockerignore_keeps_secrets_and_state_out() -> None:
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "keys", "pki", "tests"} <= ignored


def test_kafka_accepts_only_mutual_tls_and_authorizes_every_request() -> None:
    props = kafka_properties(environment(services()["kafka"]))
    protocols = dict(item.split(":") for item in props["listener.security.protocol.map"].split(","))
    listeners = [item.split("://")[0] for item in props["listeners"].split(",")]
    assert set(listeners) == set(protocols)
    assert set(protocols.values()) == {"SSL"}, "every listener, the controller's too, is TLS"
    # The image demands a JKS key store for listener names containing SSL; ours is PEM.
    assert not any("SSL" in name for name in protocols)
    assert props["ssl.client.auth"] == "required"
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PEM"
    assert props["ssl.endpoint.identification.algorithm"] == "https"
    assert props["authorizer.class.name"].endswith("StandardAuthorizer")
    assert props["allow.everyone.if.no.acl.found"] == "false"
    assert props["super.users"] == "User:broker;User:admin"
    assert props["ssl.principal.mapping.rules"] == "RULE:^CN=([^,]+)$/$1/,DEFAULT"


def _kafka_pki_clients() -> set[str]:
    (argv,) = [a for name, a in fleetbus_command_lines() if name == "kafka-pki"]
    assert _option(argv, "--out") == _option(argv, "--mounted-at") == "/kafka-pki"
    assert "kafka" in [argv[i + 1] for i, a in enumerate(argv) if a == "--san"]
    return {"admin", *(argv[i + 1] for i, a in enumerate(argv) if a == "--client")}


def test_every_kafka_client_connects_as_its_own_principal_over_tls() -> None:
    """Each fleetbus service that talks to Kafka uses SSL with a certificate kafka-pki issued,
    from the kafka-pki volume, and its principal has exactly its role in kafka-acls."""
    issued = _kafka_pki_clients()
    (acls,) = [a for name, a in fleetbus_command_lines() if name == "kafka-acls"]
    role_of = {acls[i + 1]: acls[i] for i, a in enumerate(acls) if a.startswith("--")}
    expected_role = {"worker": "--worker", "fleet": "--vehicles", "kafka-acls": None}
    clients = 0
    for name, service in services().items():
        env = environment(service)
        if "FLEETBUS_KAFKA_BOOTSTRAP" not in env or name not in expected_role:
            continue
        clients += 1
        assert env["FLEETBUS_KAFKA_SECURITY_PROTOCOL"] == "SSL", name
        assert env["FLEETBUS_KAFKA_SSL_CAFILE"] == "/kafka-pki/ca.pem", name
        cert, key = env["FLEETBUS_KAFKA_SSL_CERTFILE"], env["FLEETBUS_KAFKA_SSL_KEYFILE"]
        principal = Path(cert).stem
        assert (cert, key) == (f"/kafka-pki/{principal}.pem", f"/kafka-pki/{principal}.key")
        assert principal in issued, f"{name}: no certificate for {principal}"
        assert "kafka-pki:/kafka-pki:ro" in service["volumes"], name
        if expected_role[name] is None:
            assert principal == "admin"
        else:
            assert role_of.get(principal) == expected_role[name], (name, principal)
    assert clients == 3
    kafka = services()["kafka"]
    assert "--command-config /kafka-pki/admin.properties" in " ".join(kafka["healthcheck"]["test"])
    assert kafka["depends_on"]["kafka-pki"]["condition"] == "service_completed_successfully"
    assert services()["worker"]["depends_on"]["kafka-acls"]["condition"] == (
        "service_completed_successfully"
    )


# -- what each service may hold, and what it exposes ------------------------------------------


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Named volume → mount point (read-only flags dropped)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if not source.startswith((".", "/")):
            out[source] = target
    return out


def _init_lines(prefix: str) -> list[list[str]]:
    return [
        argv for name, argv in fleetbus_command_lines() if name == "init" and argv[:2] == prefix
    ]


def _options(argv: list[str], name: str) -> list[str]:
    return [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == name]


def _volume_at(service: str, target: str) -> str:
    (volume,) = [v for v, t in _mounts(services()[service]).items() if t == target]
    return volume


def test_only_init_mounts_the_fleet_root() -> None:
    (init_argv,) = _init_lines(["keys", "init"])
    root_volume = _volume_at("init", _option(init_argv, "--dir"))
    holders = [name for name, svc in services().items() if root_volume in _mounts(svc)]
    assert holders == ["init"], f"root.key's volume {root_volume} is mounted by {holders}"


def _export_to(service: str) -> list[str]:
    """The principals whose keys init exports into the volume ``service`` mounts at /keys."""
    volume = _volume_at(service, "/keys")
    init_mounts = _mounts(services()["init"])
    for argv in _init_lines(["keys", "export"]):
        if init_mounts.get(volume) == _option(argv, "--out"):
            return _options(argv, "--principal")
    raise AssertionError(f"{service}'s /keys volume {volume} is no export of init")


def test_the_worker_holds_only_its_sealer_key() -> None:
    sealer = FleetbusSettings.model_fields["sealer_principal"].default
    assert _export_to("worker") == [sealer]


def test_the_fleet_simulates_the_vehicles_init_issues_and_exports() -> None:
    (argv,) = [a for name, a in fleetbus_command_lines() if name == "fleet"]
    vehicles = _options(argv, "--vehicle")
    assert vehicles, "fleet simulate names its vehicles"
    assert _option(argv, "--keys-dir") == "/keys"
    issued = {_option(a, "--principal") for a in _init_lines(["keys", "issue"])}
    assert set(vehicles) <= issued
    assert _export_to("fleet") == vehicles
    # Its store of executed commands survives a restart: on a volume, not the read-only root.
    store = _option(argv, "--store")
    assert any(store.startswith(t + "/") for t in _mounts(services()["fleet"]).values())


def test_the_worker_pki_holds_its_own_client_key_and_no_ca_key() -> None:
    worker = services()["worker"]
    env = environment(worker)
    wanted = {Path(env[f"FLEETBUS_QKD_{kind}_FILE"]).name for kind in ("CA", "CERT", "KEY")}
    pki_volume = _volume_at("worker", "/pki")
    out_dir = _mounts(services()["init"])[pki_volume]
    script = "\n".join(services()["init"]["command"])
    (copy,) = [ln.split() for ln in script.splitlines() if ln.strip().startswith("cp ")]
    assert copy[-1].rstrip("/") == out_dir
    assert {Path(f).name for f in copy[1:-1]} == wanted


def test_published_ports_bind_loopback_only() -> None:
    for name, service in services().items():
        for mapping in service.get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), f"{name} publishes {mapping}"


def test_dev_services_expose_no_admin_surface() -> None:
    assert "--web.enable-lifecycle" not in services()["prometheus"]["command"]
    grafana = environment(services()["grafana"])
    # No login form and no basic auth: the image's default admin password opens nothing.
    assert grafana["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert grafana["GF_AUTH_BASIC_ENABLED"] == "false"
    assert grafana.get("GF_AUTH_ANONYMOUS_ORG_ROLE", "Viewer") == "Viewer"


def test_state_tmpfs_belongs_to_the_image_user() -> None:
    for name, service in services().items():
        for entry in service.get("tmpfs", []):
            path, _, options = entry.partition(":")
            if path.startswith("/var/lib/fleetbus"):
                assert {"uid=10001", "gid=10001"} <= set(options.split(",")), name


def test_kafka_pki_keeps_an_existing_pki() -> None:
    # It drops CAP_DAC_OVERRIDE: a second run could not read the files it handed to uid 1000.
    first = services()["kafka-pki"]["command"][0].strip().splitlines()[0]
    assert first == "if [ -f /kafka-pki/ca.pem ]; then exit 0; fi"


def test_kafka_data_is_on_its_volume() -> None:
    kafka = services()["kafka"]
    assert environment(kafka)["KAFKA_LOG_DIRS"] == _mounts(kafka)["kafka-data"]


def _requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~;\s]", spec, maxsplit=1)[0].lower().replace("_", "-")


def test_image_installs_locked_versions() -> None:
    import tomllib

    lock: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            lock[_requirement_name(name)] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [*project["project"]["dependencies"], *project["build-system"]["requires"]]
    missing = {_requirement_name(spec) for spec in needed} - set(lock)
    assert not missing, f"not in constraints.txt: {sorted(missing)}"
    instructions = _dockerfile_instructions()
    env = " ".join(rest for kw, rest in instructions if kw == "ENV")
    assert "PIP_CONSTRAINT=/src/constraints.txt" in env
    assert ("COPY", "constraints.txt ./") in instructions
