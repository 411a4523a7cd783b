"""``fleetbus kme``: run the simulated QKD link (two ETSI GS QKD 014 KMEs) and its test PKI."""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

kme_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Simulated QKD link: two ETSI GS QKD 014 KMEs with mutual TLS (a simulator, not QKD).",
)

#: Printed (followed by a JSON object of URLs) on stdout once every listener is up.
READY_PREFIX = "fleetbus-kme ready "

DEFAULT_SAE_A = ["sae-dispatch-hub"]
DEFAULT_SAE_B = ["sae-depot-north"]

AdminUrlOpt = Annotated[
    str, typer.Option(envvar="FLEETBUS_KME_ADMIN_URL", help="the admin endpoint of `kme serve`")
]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@kme_app.command("serve")
def serve(
    cert_dir: Annotated[
        Path,
        typer.Option(envvar="FLEETBUS_KME_CERT_DIR", help="directory written by `kme certs`"),
    ],
    host: Annotated[str, typer.Option(envvar="FLEETBUS_KME_HOST")] = "127.0.0.1",
    port_a: Annotated[
        int, typer.Option(envvar="FLEETBUS_KME_PORT_A", help="KME-A port, 0 = any free")
    ] = 8443,
    port_b: Annotated[
        int, typer.Option(envvar="FLEETBUS_KME_PORT_B", help="KME-B port, 0 = any free")
    ] = 8444,
    admin_port: Annotated[
        int,
        typer.Option(envvar="FLEETBUS_KME_ADMIN_PORT", help="switches + /metrics, on 127.0.0.1"),
    ] = 9464,
    admin_mtls: Annotated[
        bool, typer.Option(help="require the kme-admin client certificate on the admin port")
    ] = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            envvar="FLEETBUS_KME_METRICS_PORT",
            help="serve GET /metrics (only) on this port too, 0 = any free [default: off]",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            envvar="FLEETBUS_KME_METRICS_HOST",
            help="address of the metrics-only listener (e.g. 0.0.0.0 for Prometheus)",
        ),
    ] = "127.0.0.1",
    state_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="FLEETBUS_KME_STATE_DIR",
            help="keep the key pool and unfetched keys here across restarts (key material at "
            "rest, mode 0600) [default: memory only]",
        ),
    ] = None,
    key_rate: Annotated[
        float, typer.Option(envvar="FLEETBUS_KME_KEY_RATE", help="secret key rate, bits/s")
    ] = 10_000.0,
    pool_size: Annotated[
        int,
        typer.Option(envvar="FLEETBUS_KME_POOL_SIZE", help="pool bound in keys (max_key_count)"),
    ] = 1000,
    prefill: Annotated[
        int | None, typer.Option(help="keys in the pool at start [default: a full pool]")
    ] = None,
    key_size: Annotated[int, typer.Option(help="default key size, bits")] = 256,
    max_key_per_request: Annotated[int, typer.Option()] = 128,
    sae_a: Annotated[
        list[str] | None, typer.Option(help="SAE id at site A (repeat) [sae-dispatch-hub]")
    ] = None,
    sae_b: Annotated[
        list[str] | None, typer.Option(help="SAE id at site B (repeat) [sae-depot-north]")
    ] = None,
    qber_threshold: Annotated[float, typer.Option()] = 0.11,
    flush_on_eavesdropper: Annotated[
        bool, typer.Option(help="drop the unreserved pool when an eavesdropper is detected")
    ] = False,
) -> None:
    """Run KME-A and KME-B joined by a simulated link until SIGTERM or SIGINT."""
    from pydantic import ValidationError

    from fleetbus.bus.errors import ConfigError
    from fleetbus.kmesim.server import KMEPairConfig, PairEndpoints, serve_pair

    try:
        config = KMEPairConfig.from_cert_dir(
            cert_dir,
            host=host,
            port_a=port_a,
            port_b=port_b,
            admin_port=admin_port,
            admin_mtls=admin_mtls,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            state_dir=state_dir,
            key_rate_bps=key_rate,
            max_key_count=pool_size,
            prefill_keys=prefill,
            key_size=key_size,
            max_key_per_request=max_key_per_request,
            sae_a=tuple(sae_a or DEFAULT_SAE_A),
            sae_b=tuple(sae_b or DEFAULT_SAE_B),
            qber_threshold=qber_threshold,
            flush_on_eavesdropper=flush_on_eavesdropper,
        )
    except (ValidationError, ConfigError) as exc:
        raise _fail(f"invalid KME settings: {exc}") from None
    for path in (config.ca_file, config.kme_a_cert, config.kme_a_key):
        if not path.is_file():
            raise _fail(f"{path} not found; create it with `fleetbus kme certs --out {cert_dir}`")

    def ready(endpoints: PairEndpoints) -> None:
        print(READY_PREFIX + json.dumps(endpoints.as_dict()), flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await serve_pair(config, stop, ready)

    try:
        asyncio.run(main())
    except (OSError, ssl.SSLError, ConfigError) as exc:  # ConfigError: KMEStateError too
        raise _fail(f"cannot start the KMEs: {exc}") from None
    typer.echo("fleetbus-kme stopped", err=True)


@kme_app.command("certs")
def certs(
    out: Annotated[Path, typer.Option(help="directory to write into (created)")],
    sae: Annotated[
        list[str] | None,
        typer.Option(help="SAE id to issue a client cert for (repeat)"),
    ] = None,
    days: Annotated[int, typer.Option(help="validity in days")] = 30,
    admin: Annotated[bool, typer.Option(help="also issue the kme-admin client cert")] = True,
    san: Annotated[
        list[str] | None,
        typer.Option(
            help="extra DNS name or IP address for the KME server certs (repeat), e.g. kme"
        ),
    ] = None,
    kme_a_id: Annotated[
        str, typer.Option(help="KME-A's KME ID: its server certificate's subject CN")
    ] = "KME-A",
    kme_b_id: Annotated[
        str, typer.Option(help="KME-B's KME ID: its server certificate's subject CN")
    ] = "KME-B",
) -> None:
    """Write a test CA, KME-A/KME-B server certs and SAE client certs (keys mode 0600).

    `serve` reports the KME IDs the server certificates name; SAEs check them (ETSI 014 5.1).
    """
    from fleetbus.bus.errors import FleetbusError
    from fleetbus.devtools.kme_pki import make_test_pki

    try:
        pki = make_test_pki(
            out,
            sae or [*DEFAULT_SAE_A, *DEFAULT_SAE_B],
            admin=admin,
            valid_days=days,
            server_sans=san or (),
            kme_ids=(kme_a_id, kme_b_id),
        )
    except FleetbusError as exc:
        raise _fail(str(exc)) from None
    typer.echo(f"CA: {pki.ca_cert}")
    for name, pair in {**pki.kmes, **pki.saes}.items():
        typer.echo(f"{name}: {pair.cert} {pair.key}")
    if pki.admin is not None:
        typer.echo(f"admin: {pki.admin.cert} {pki.admin.key}")


def _admin_call(
    admin_url: str, method: str, path: str, body: dict[str, Any] | None, tls_dir: Path | None
) -> dict[str, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(  # noqa: S310 - the URL is the operator's own admin endpoint
        admin_url.rstrip("/") + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    ctx = None
    if tls_dir is not None:
        ctx = ssl.create_default_context(cafile=str(tls_dir / "ca.pem"))
        ctx.load_cert_chain(str(tls_dir / "admin.pem"), str(tls_dir / "admin.key"))
    try:
        with urllib.request.urlopen(request, timeout=5, context=ctx) as resp:  # noqa: S310
            result = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")
        raise _fail(f"admin endpoint answered {exc.code}: {detail}") from None
    except (OSError, ValueError) as exc:
        raise _fail(f"admin endpoint {admin_url} unusable: {exc}") from None
    if not isinstance(result, dict):
        raise _fail("admin endpoint did not answer a JSON object")
    return result


TlsDirOpt = Annotated[
    Path | None,
    typer.Option(help="with --admin-mtls servers: directory holding ca.pem and admin.{pem,key}"),
]


@kme_app.command("link")
def link(
    up: Annotated[bool, typer.Option("--up/--down", help="bring the QKD link up or down")],
    admin_url: AdminUrlOpt = "http://127.0.0.1:9464",
    tls_dir: TlsDirOpt = None,
) -> None:
    """Switch the simulated QKD link up or down."""
    typer.echo(json.dumps(_admin_call(admin_url, "POST", "/admin/link", {"up": up}, tls_dir)))


@kme_app.command("eavesdropper")
def eavesdropper(
    on: Annotated[bool, typer.Option("--on/--off", help="put an eavesdropper on the link")],
    admin_url: AdminUrlOpt = "http://127.0.0.1:9464",
    tls_dir: TlsDirOpt = None,
) -> None:
    """Switch the simulated eavesdropper (QBER above threshold) on or off."""
    body = {"on": on}
    typer.echo(json.dumps(_admin_call(admin_url, "POST", "/admin/eavesdropper", body, tls_dir)))


@kme_app.command("state")
def state(admin_url: AdminUrlOpt = "http://127.0.0.1:9464", tls_dir: TlsDirOpt = None) -> None:
    """Print the link's state: switches, QBER, pool level, keys delivered."""
    typer.echo(json.dumps(_admin_call(admin_url, "GET", "/admin/state", None, tls_dir), indent=2))


if __name__ == "__main__":
    sys.exit(kme_app())
