"""``fleetbus keys``: create the fleet root, issue, rotate, revoke and show key records.

Files in the key directory ``D``: ``root.key`` (0600, the root's private keys), ``root.pub`` (the
pinned root public key), ``directory.cbor`` (the signed directory head and all signed records),
``directory-head.<root kid>.cbor`` (the highest head accepted here) and ``<principal>.key``
(0600). Every change signs a new head with the next sequence number. With a Kafka bootstrap
(``--bootstrap`` or ``FLEETBUS_KAFKA_BOOTSTRAP``), ``issue``, ``rotate``, ``revoke`` and
``rehead`` also publish the change — its records, then the new head — to the compacted key topic
that workers and vehicle agents follow; ``publish`` sends the whole folder again. ``show`` never
prints private key material.

A head divides the vehicles into ``--buckets`` buckets (Kafka's partition of the vehicle id over
that count): ``init`` takes the configured partition count (``FLEETBUS_PARTITIONS``) unless told
otherwise, every later head keeps its predecessor's count, and ``rehead`` signs the next head
over the same records with another count (a worker with ``directory_scope`` partitions needs
buckets = partitions).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

from fleetbus.bus.directory import (
    COMMAND_RECIPIENT_KINDS,
    KINDS,
    MAX_VEHICLE_BUCKETS,
    ROOT_SUITE,
    FleetRoot,
    KeyDirectory,
    KeyRecord,
    RootPublicKey,
    SignedDirectoryHead,
    SignedKeyRecord,
    head_store_for,
    issue_key,
    load_directory,
    load_key_file,
    next_head,
    read_directory_file,
    save_key_file,
    sign_directory,
    write_directory_file,
)
from fleetbus.bus.errors import ConfigError, FleetbusError, ReasonCode
from fleetbus.bus.keyfolder import DIRECTORY, ROOT_PUB, KeyFolder
from fleetbus.bus.registry import is_kem_algorithm, kem_provider_for_algorithm
from fleetbus.sdk.keytopic import publish_key_change

keys_app = typer.Typer(no_args_is_help=True, help=__doc__)

DirOpt = Annotated[Path, typer.Option("--dir", help="key directory (root, records, key files)")]
PrincipalOpt = Annotated[str, typer.Option("--principal", help="principal id, e.g. veh-0001")]
BootstrapOpt = Annotated[
    str | None,
    typer.Option(
        "--bootstrap",
        envvar="FLEETBUS_KAFKA_BOOTSTRAP",
        help="Kafka bootstrap: also publish the change to the key topic (topic names and TLS "
        "from the FLEETBUS_* settings)",
    ),
]

_BUCKETS_HELP = (
    f"vehicle buckets of the directory head (1..{MAX_VEHICLE_BUCKETS}): a worker with "
    "directory_scope partitions needs it equal to the topics' partition count "
    "(FLEETBUS_PARTITIONS)"
)

#: Used with ``fullmatch`` (``$`` would let a trailing newline through).
_PRINCIPAL_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
DAY_S = 86400.0


def _now() -> float:
    return time.time()


def _check_principal(principal: str) -> None:
    if not _PRINCIPAL_RE.fullmatch(principal) or principal == "root":
        raise ConfigError(
            f"invalid principal id {principal!r}: use letters, digits, '.', '_', ':', '-' "
            "(not 'root')"
        )


def _load_root(directory: Path) -> FleetRoot:
    root = FleetRoot.from_key_file(load_key_file(KeyFolder(directory).root_key))
    pinned = RootPublicKey.from_bytes(KeyFolder(directory).root_pub.read_bytes())
    if pinned != root.public:
        raise FleetbusError(
            f"{KeyFolder(directory).root_key} does not match {KeyFolder(directory).root_pub}",
            reason=ReasonCode.BAD_SIGNATURE,
        )
    return root


def _load_public(directory: Path) -> KeyDirectory:
    try:
        root = RootPublicKey.from_bytes(KeyFolder(directory).root_pub.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"{KeyFolder(directory).root_pub} not found; run `fleetbus keys init`"
        ) from None
    # The root holder writes these records on (the next file, the topic): each is verified.
    return load_directory(
        KeyFolder(directory).directory,
        root,
        head_store=head_store_for(directory, root),
        verify_each=True,
    )


def _publish(
    directory: Path,
    root: FleetRoot,
    current: KeyDirectory,
    signed: SignedKeyRecord | None,
    bootstrap: str | None,
    *,
    vehicle_buckets: int | None = None,
) -> SignedDirectoryHead:
    """Add ``signed`` (if any) and write the records under the next head (file first, then the
    accepted head), then, with a bootstrap, send the record and the head to the key topic.
    ``vehicle_buckets``: the new head's bucket count (None: the current head's)."""
    if signed is not None:
        current.ingest(signed)
    head = next_head(root, current, previous=current.head, vehicle_buckets=vehicle_buckets)
    write_directory_file(KeyFolder(directory).directory, head, current.signed_records())
    current.ingest_head(head)
    if bootstrap:
        publish_key_change(_settings(bootstrap), [] if signed is None else [signed], head)
    return head


def _check_buckets(buckets: int, source: str = "--buckets") -> int:
    """``buckets`` if a head may be signed with it (1..MAX_VEHICLE_BUCKETS), else a ConfigError
    naming ``source`` (the option, or the setting it came from)."""
    if not 1 <= buckets <= MAX_VEHICLE_BUCKETS:
        raise ConfigError(
            f"{source} must be a whole number from 1 to {MAX_VEHICLE_BUCKETS}, not {buckets}: "
            "the directory head's vehicle buckets (set it to the topics' partition count, "
            "FLEETBUS_PARTITIONS, for workers with directory_scope partitions)"
        )
    return buckets


def _configured_partitions() -> int | None:
    """``FLEETBUS_PARTITIONS`` as the settings read it here (None: the settings do not load)."""
    from fleetbus.bus.settings_env import load_settings

    try:
        return load_settings().partitions
    except ConfigError:
        return None


def _buckets_note(buckets: int) -> str:
    """A hint when ``buckets`` is not this environment's partition count."""
    partitions = _configured_partitions()
    if partitions is None or partitions == buckets:
        return ""
    return (
        f"\nnote: the partition count configured here (FLEETBUS_PARTITIONS) is {partitions}: a "
        f"worker with directory_scope partitions and {partitions} partitions holds the whole "
        f"fleet under this head (`fleetbus keys rehead --buckets {partitions}` matches it)"
    )


def _settings(bootstrap: str) -> Any:
    from fleetbus.bus.settings import FleetbusSettings

    return FleetbusSettings(kafka_bootstrap=bootstrap)


def _key_path(directory: Path, principal: str) -> Path:
    return KeyFolder(directory).private_key(principal)


@keys_app.command("init")
def init(
    directory: DirOpt,
    buckets: Annotated[
        int | None,
        typer.Option("--buckets", help=_BUCKETS_HELP + "; default: the configured partition count"),
    ] = None,
) -> None:
    """Create the hybrid fleet root key (root.key 0600, root.pub) and an empty directory whose
    head has --buckets vehicle buckets (default: FLEETBUS_PARTITIONS, so that workers with
    directory_scope partitions hold only their partitions' vehicles)."""
    source = "--buckets"
    if buckets is None:
        from fleetbus.bus.settings_env import load_settings

        buckets, source = load_settings().partitions, "FLEETBUS_PARTITIONS (--buckets' default)"
    _check_buckets(buckets, source)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    if KeyFolder(directory).root_key.exists():
        raise ConfigError(
            f"{KeyFolder(directory).root_key} already exists; refusing to replace the root"
        )
    root = FleetRoot.generate(ROOT_SUITE)
    save_key_file(KeyFolder(directory).root_key, root.key_file())
    KeyFolder(directory).root_pub.write_bytes(root.public.to_bytes())
    made = ""
    if not KeyFolder(directory).directory.exists():
        head, records = sign_directory(root, [], vehicle_buckets=buckets)
        write_directory_file(KeyFolder(directory).directory, head, records)
        head_store_for(directory, root.public).save(head)
        made = f"; directory head 1 with {buckets} vehicle buckets"
    typer.echo(f"fleet root {root.key_id} ({root.public.suite}) created in {directory}{made}")


@keys_app.command("issue")
def issue(
    directory: DirOpt,
    principal: PrincipalOpt,
    kind: Annotated[str, typer.Option(help=f"one of: {', '.join(sorted(KINDS - {'root'}))}")],
    suite: Annotated[str, typer.Option(help="signature suite")] = ROOT_SUITE,
    kem: Annotated[
        list[str] | None,
        typer.Option(help="KEM key to add (repeatable): a key provider with a recipient key"),
    ] = None,
    qkd_sae_id: Annotated[str | None, typer.Option(help="ETSI 014 SAE id of the principal")] = None,
    valid_days: Annotated[float, typer.Option(help="validity from now, in days")] = 365.0,
    capability: Annotated[
        list[str] | None, typer.Option(help="capability (repeatable); pqc/qkd are added for you")
    ] = None,
    group: Annotated[list[str] | None, typer.Option(help="group (repeatable)")] = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Issue the first key of a principal: writes <principal>.key (0600) and a signed record."""
    _check_principal(principal)
    if kind not in KINDS - {"root"}:
        raise ConfigError(f"unknown kind {kind!r}; choose from {', '.join(sorted(KINDS))}")
    if valid_days <= 0:
        raise ConfigError("--valid-days must be positive")
    root = _load_root(directory)
    current = _load_public(directory)
    if current.records(principal):
        raise ConfigError(f"principal {principal!r} already has keys; use `rotate`")
    now = _now()
    issued = issue_key(
        root,
        principal_id=principal,
        kind=kind,
        signature_suite=suite,
        kems=kem or [],
        capabilities=capability or [],
        qkd_sae_id=qkd_sae_id,
        not_before=now,
        not_after=now + valid_days * DAY_S,
        groups=group or [],
    )
    record = issued.signed.record
    if kem and kind in COMMAND_RECIPIENT_KINDS:
        _check_sealable(record)
    save_key_file(_key_path(directory, principal), issued.key_file)
    _publish(directory, root, current, issued.signed, bootstrap)
    typer.echo(f"issued {principal} v{record.version} key {record.key_id}")


def _check_sealable(record: KeyRecord) -> None:
    """Refuse KEM keys that a profile the rules would choose for this record cannot seal to:
    every command routed there would be refused (``key_path_exhausted``) for the record's whole
    life. The profiles and rules are this process's ``FLEETBUS_*`` settings, the workers' own
    (docs/key-paths.md §3, "Keys a profile can seal to")."""
    from fleetbus.bus.settings_env import load_settings
    from fleetbus.providers.keypath import profiles_unable_to_seal

    unable = profiles_unable_to_seal(
        load_settings(),
        record.public_keys,
        record.capabilities,
        has_sae_id=record.qkd_sae_id is not None,
    )
    if unable:
        raise ConfigError(
            f"refusing to issue {record.principal_id}: its KEM keys "
            f"({', '.join(sorted(a for a in record.public_keys if is_kem_algorithm(a)))}) and "
            f"capabilities ({', '.join(sorted(record.capabilities)) or 'none'}) cannot be sealed "
            f"to by {'; '.join(unable.values())}. Issue keys one of those paths takes, or add a "
            "profile and a rule for these keys (docs/key-paths.md §3)"
        )


@keys_app.command("rotate")
def rotate(
    directory: DirOpt,
    principal: PrincipalOpt,
    overlap_hours: Annotated[
        float, typer.Option(help="how long the previous key still verifies")
    ] = 24.0,
    valid_days: Annotated[float | None, typer.Option(help="default: same as before")] = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Issue a new version of a principal's key; the old one verifies for --overlap-hours more."""
    _check_principal(principal)
    if overlap_hours < 0:
        raise ConfigError("--overlap-hours must not be negative")
    root = _load_root(directory)
    current = _load_public(directory)
    latest = current.latest(principal)
    now = _now()
    lifetime = valid_days * DAY_S if valid_days else latest.not_after - latest.not_before
    if not math.isfinite(lifetime) or lifetime <= 0:
        lifetime = 365 * DAY_S
    kems = [
        name
        for name in (kem_provider_for_algorithm(alg) for alg in latest.public_keys)
        if name is not None
    ]
    issued = issue_key(
        root,
        principal_id=principal,
        kind=latest.kind,
        version=latest.version + 1,
        signature_suite=latest.signature_suite,
        kems=kems,
        capabilities=latest.capabilities,
        qkd_sae_id=latest.qkd_sae_id,
        not_before=now,
        not_after=now + lifetime,
        groups=latest.groups,
        overlap_s=overlap_hours * 3600.0,
    )
    key_path = _key_path(directory, principal)
    if key_path.exists():
        # Keep the previous private key: messages sealed to it may arrive during the overlap.
        os.replace(key_path, KeyFolder(directory).retired_key(principal, latest.version))
    save_key_file(key_path, issued.key_file)
    _publish(directory, root, current, issued.signed, bootstrap)
    typer.echo(
        f"rotated {principal} to v{issued.signed.record.version} key "
        f"{issued.signed.record.key_id}; v{latest.version} ({latest.key_id}) verifies for "
        f"{overlap_hours:g} h more"
    )


@keys_app.command("revoke")
def revoke(
    directory: DirOpt,
    principal: PrincipalOpt,
    key_id: Annotated[
        str | None, typer.Option("--key-id", help="default: the principal's latest key")
    ] = None,
    bootstrap: BootstrapOpt = None,
) -> None:
    """Revoke a key now: a signed revocation record and a new head, in force at every worker
    and vehicle agent following the key topic within seconds of its publication."""
    root = _load_root(directory)
    current = _load_public(directory)
    record = current.latest(principal) if key_id is None else current.record(key_id)
    if record is None or record.principal_id != principal:
        raise FleetbusError(
            f"no key {key_id!r} for principal {principal!r}", reason=ReasonCode.UNKNOWN_SIGNER
        )
    if record.revoked:
        typer.echo(f"{principal} key {record.key_id} is already revoked")
        return
    _publish(directory, root, current, root.sign(record.revocation(at=_now())), bootstrap)
    typer.echo(f"revoked {principal} v{record.version} key {record.key_id}")


@keys_app.command("rehead")
def rehead(
    directory: DirOpt,
    buckets: Annotated[int, typer.Option("--buckets", help=_BUCKETS_HELP)],
    bootstrap: BootstrapOpt = None,
) -> None:
    """Sign the next head over the same records with --buckets vehicle buckets.

    The records are not changed; the head's sequence number grows by one as for any change.
    Processes that receive the head re-divide the vehicles they hold; a worker with
    directory_scope partitions holds only its partitions' vehicles once buckets = partitions
    and it has restarted with the new directory.cbor (docs/key-management.md, "Choosing the
    bucket count").
    """
    _check_buckets(buckets)
    root = _load_root(directory)
    current = _load_public(directory)
    previous = current.head
    assert previous is not None  # load_directory refuses a file without one
    if previous.vehicle_buckets == buckets:
        typer.echo(
            f"directory head {previous.seq} already has {buckets} vehicle buckets; nothing "
            "signed (`fleetbus keys publish` sends the current head again)"
        )
        return
    head = _publish(directory, root, current, None, bootstrap, vehicle_buckets=buckets)
    typer.echo(
        f"signed directory head {head.head.seq} over the same {head.head.record_count} records "
        f"with {buckets} vehicle buckets (head {previous.seq} had {previous.vehicle_buckets})"
        + (f"; published to the key topic at {bootstrap}" if bootstrap else "")
        + _buckets_note(buckets)
    )


@keys_app.command("publish")
def publish(
    directory: DirOpt,
    bootstrap: Annotated[
        str,
        typer.Option("--bootstrap", envvar="FLEETBUS_KAFKA_BOOTSTRAP", help="Kafka bootstrap"),
    ],
) -> None:
    """Publish every record of the folder and its current head to the key topic (first set-up,
    or after a publication failed or someone re-published old records)."""
    current = _load_public(directory)
    head = current.signed_head
    assert head is not None  # load_directory refuses a file without one
    records = current.signed_records()
    publish_key_change(_settings(bootstrap), records, head)
    typer.echo(f"published {len(records)} records and directory head {head.head.seq}")


@keys_app.command("migrate")
def migrate(directory: DirOpt) -> None:
    """Sign the first directory head over a directory.cbor written before heads existed.

    Run it once, on the root's own copy: the head vouches for exactly the records in that file,
    so a copy missing a revocation would make the missing revocation permanent.
    """
    root = _load_root(directory)
    content = read_directory_file(KeyFolder(directory).directory)
    if content.head is not None:
        raise ConfigError(
            f"{KeyFolder(directory).directory} already has a head (seq {content.head.head.seq})"
        )
    store = head_store_for(directory, root.public)
    if store.load(root.public) is not None:
        raise FleetbusError(
            f"{store.path} holds a head although {KeyFolder(directory).directory} has none: "
            "the file was replaced by an older copy",
            reason=ReasonCode.DIRECTORY_ROLLBACK,
        )
    head, records = sign_directory(root, content.records)
    write_directory_file(KeyFolder(directory).directory, head, records)
    store.save(head)
    revoked = sum(1 for signed in records if signed.record.revoked)
    typer.echo(
        f"signed directory head 1 over {len(records)} records ({revoked} revoked) in "
        f"{KeyFolder(directory).directory}"
    )


def _iso(ts: float) -> str:
    if not math.isfinite(ts):
        return "never"
    return datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="seconds")


def _row(record: KeyRecord, directory: KeyDirectory) -> dict[str, Any]:
    superseded = directory.superseded_at(record)
    return {
        "principal": record.principal_id,
        "kind": record.kind,
        "version": record.version,
        "key_id": record.key_id,
        "suite": record.signature_suite,
        "algorithms": record.algorithms(),
        "capabilities": sorted(record.capabilities),
        "qkd_sae_id": record.qkd_sae_id,
        "groups": sorted(record.groups),
        "not_before": _iso(record.not_before),
        "not_after": _iso(record.not_after),
        "superseded_after": None if math.isinf(superseded) else _iso(superseded),
        "revoked": record.revoked,
        "revoked_at": None if record.revoked_at is None else _iso(record.revoked_at),
    }


@keys_app.command("show")
def show(
    directory: DirOpt,
    principal: Annotated[str | None, typer.Option("--principal")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Print the verified records (public data only)."""
    current = _load_public(directory)
    head = current.head
    assert head is not None  # load_directory refuses a file without one
    rows = [_row(r, current) for r in current.records(principal)]
    if as_json:
        doc = {
            "root_key_id": current.root.key_id,
            "head": {
                "seq": head.seq,
                "issued_at": _iso(head.issued_at),
                "vehicle_buckets": head.vehicle_buckets,
            },
            "records": rows,
        }
        typer.echo(json.dumps(doc, indent=2))
        return
    typer.echo(f"fleet root {current.root.key_id} ({current.root.suite})")
    typer.echo(
        f"directory head {head.seq} of {_iso(head.issued_at)}, {head.record_count} records, "
        f"{head.vehicle_buckets} vehicle buckets"
    )
    if not rows:
        typer.echo("no records")
    for row in rows:
        state = "REVOKED " + str(row["revoked_at"]) if row["revoked"] else "active"
        if row["superseded_after"] and not row["revoked"]:
            state = f"superseded after {row['superseded_after']}"
        typer.echo(
            f"{row['principal']:<20} {row['kind']:<10} v{row['version']:<3} {row['key_id']}  "
            f"{','.join(row['algorithms'])}  {row['not_before']} .. {row['not_after']}  {state}"
        )


@keys_app.command("export")
def export(
    directory: DirOpt,
    out: Annotated[Path, typer.Option("--out", help="the service's key folder to write")],
    principal: Annotated[
        list[str] | None,
        typer.Option("--principal", help="principal whose private key goes along (repeatable)"),
    ] = None,
) -> None:
    """Write what one service may hold: root.pub, directory.cbor and its principals' own keys.

    Never root.key or another principal's key. Private keys of earlier exports that this one
    does not name are removed from OUT, so a service loses a key by exporting again.
    """
    from fleetbus.bus.files import write_private_file

    if out.resolve() == directory.resolve():
        raise ConfigError("--out must be another folder than --dir")
    current = _load_public(directory)  # verifies every record against the pinned root
    keys: dict[str, bytes] = {}
    for name in principal or []:
        _check_principal(name)
        if not current.records(name):
            raise ConfigError(f"principal {name!r} has no keys in {directory}")
        # Rotated predecessors too: messages sealed to them may still arrive in the overlap.
        for path in [_key_path(directory, name), *KeyFolder(directory).retired_keys(name)]:
            if load_key_file(path).principal_id != name:  # also refuses group/other access
                raise ConfigError(f"{path} holds another principal's key")
            keys[path.name] = path.read_bytes()
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in KeyFolder(out).private_keys():
        if stale.name not in keys:
            stale.unlink()
    for name in (ROOT_PUB, DIRECTORY):
        write_private_file(out / name, (directory / name).read_bytes())
    for name, data in keys.items():
        write_private_file(out / name, data)
    typer.echo(f"exported {ROOT_PUB}, {DIRECTORY} and {len(keys)} private key file(s) to {out}")
