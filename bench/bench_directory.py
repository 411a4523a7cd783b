"""The key directory at fleet scale: synthetic fleets of 10^4, 10^5 and 10^6 vehicles.

Per fleet size, each in a fresh process (so resident memory is that process's own):
* worker start-up: ``load_directory`` of the whole ``directory.cbor`` (what ``build_pipeline``
  does), time and RSS; and, for comparison where it fits in time, the same load verifying every
  record's own root signature (``verify_each``, the path every loader took before);
* vehicle agent start-up: ``load_key_directory(..., vehicles=[one id])`` (set 0 and its own
  vehicle), time, RSS and the size of the directory state it keeps;
* with ``--shares 1,2,8``: a seal stage serving K of the 16 partitions (set 0 and K buckets,
  ``load_directory(..., scope=)``), time and RSS (issue 12);
* lookups in the worker's directory: ``recipient_keys`` of a random vehicle, ``verifier_for`` of
  a dispatcher, per call;
* with ``--rebalance SIZES``: a worker with ``directory_scope=partitions`` (16 partitions) on
  a local Kafka broker whose key topic holds the whole fleet (as after ``keys publish``):
  its start (set 0, plus the whole file read once for the registry's roster), then taking
  1 bucket, 3 more, and dropping 3 again (``PartitionBuckets``): time from ``directory.cbor``,
  time of the key topic's filtered re-read, RSS, vehicles held;
* with ``--propagation SIZES``: revocations published to a local Kafka broker while 2 worker
  processes (each holding the whole fleet) and 100 vehicle agents' key-topic readers (set 0,
  in 2 processes) follow the topic; the time from the revocation record's producer timestamp
  to its being in force in each.

The synthetic fleet: a fleet root with an **Ed25519** signature (not the composite
ML-DSA-65 + Ed25519 root of a real fleet: 10^6 composite signatures take hours on 2 cores), one
sealer, 20 dispatchers, 5 approvers (real keys), and vehicles whose public keys are **random
bytes of the real sizes** (Ed25519 32 B, X-Wing 1216 B, X25519 32 B; never used to encrypt).
Records are signed in 2 processes once and cached under ``~/.cache/fleetbus/bench-directory``.
A composite root makes every record 3.2 KB larger (its signature); a loader no longer checks
record signatures one by one when the head covers them, so that changes bytes read and held,
not signature work. Prints a table and writes bench/results/directory.json.

    .venv/bin/python bench/bench_directory.py [--sizes 10000,100000,1000000]
        [--propagation 10000,100000] [--revocations 10] [--shares 1,2,8]
        [--rebalance 10000,100000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from fleetbus.bus.directory import (
    DEFAULT_VEHICLE_BUCKETS,
    DirectoryHead,
    DirectoryScope,
    FleetRoot,
    KeyRecord,
    RootPublicKey,
    SignedKeyRecord,
    build_head,
    derive_key_id,
    issue_key,
    load_directory,
    load_key_file,
    read_directory_file,
    save_key_file,
    write_directory_file,
)
from fleetbus.bus.keyfolder import KeyFolder
from fleetbus.devtools.kafka import cache_root

RESULTS = Path(__file__).parent / "results" / "directory.json"
CACHE = cache_root() / "bench-directory"
T0 = 1_800_000_000.0
YEAR = 365 * 86400.0
DISPATCHERS = 20
APPROVERS = 5
KEY_SIZES = {"ed25519": 32, "xwing": 1216, "x25519": 32}


def vehicle_id(i: int) -> str:
    return f"V-{i:07d}"


def _sign_chunk(args: tuple[dict[str, bytes], dict[str, Any], int, int]) -> list[bytes]:
    private, public_doc, start, stop = args
    root = FleetRoot(private, RootPublicKey(**public_doc))
    rng = random.Random(start)  # noqa: S311 - synthetic public keys, never used to encrypt
    out = []
    for i in range(start, stop):
        keys = {alg: rng.randbytes(size) for alg, size in KEY_SIZES.items()}
        record = KeyRecord(
            principal_id=vehicle_id(i),
            kind="vehicle",
            version=1,
            key_id=derive_key_id(keys),
            public_keys=keys,
            signature_suite="ed25519",
            capabilities=frozenset({"pqc"}),
            not_before=T0 - YEAR,
            not_after=T0 + 10 * YEAR,
            groups=frozenset({f"depot-{i % 100:02d}"}),
        )
        out.append(root.sign(record).to_cbor())
    return out


def rehead(folder: Path) -> None:
    """Re-sign a cached fleet's head when it was built with another vehicle bucket function
    (caches from before buckets became Kafka's partitioner): its records and their signatures
    stay valid, only the head's per-set digests change; one root signature. The file is read
    as a stream twice (the sets, then the copy); the new file is built in memory."""
    import hashlib

    from fleetbus.bus.directory import open_directory_file, principal_set, set_digest
    from fleetbus.bus.directory import signed_record_fields as fields

    path = KeyFolder(folder).directory
    with open_directory_file(path) as stream:
        assert stream.head is not None
        old = stream.head.head
        entries: list[list[tuple[str, bytes]]] = [[] for _ in range(1 + old.vehicle_buckets)]
        for item in stream.records:
            principal, kind, key_id, record_cbor = fields(item.data)
            index = principal_set(principal, kind, old.vehicle_buckets)
            entries[index].append((key_id, hashlib.sha256(record_cbor).digest()))
    sets = tuple((len(items), set_digest(items)) for items in entries)
    if sets == old.sets:
        return
    # One more than the cached head: an agent's head store remembers that one, and another
    # head with its number would be a fork.
    head = DirectoryHead(old.seq + 1, old.issued_at, old.vehicle_buckets, sets)
    root = FleetRoot.from_key_file(load_key_file(KeyFolder(folder).root_key))
    with open_directory_file(path) as stream:
        write_directory_file(path, root.sign_head(head), (i.data for i in stream.records))
    print(f"re-signed the head of {folder} for the current bucket function", file=sys.stderr)


def fleet_folder(n: int, *, check_head: bool = False) -> Path:
    """The cached synthetic fleet of ``n`` vehicles (generated on first use; with
    ``check_head``, its head re-signed if it predates the current bucket function)."""
    folder = CACHE / f"fleet-{n}"
    if KeyFolder(folder).directory.exists():
        if check_head:
            # In a child: the parent's peak RSS would be inherited by every child it starts.
            subprocess.run(  # noqa: S603 - this script, with its own arguments
                [sys.executable, __file__, "--rehead", "--sizes", str(n)], check=True
            )
        return folder
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    started = time.perf_counter()
    root = FleetRoot.generate("ed25519")
    common = [
        issue_key(
            root,
            principal_id="bus-sealer",
            kind="sealer",
            kems=["xwing"],
            not_before=T0 - YEAR,
            not_after=T0 + 10 * YEAR,
        )
    ]
    common += [
        issue_key(
            root,
            principal_id=f"dispatch-{d}",
            kind="dispatcher",
            signature_suite="ed25519",
            not_before=T0 - YEAR,
            not_after=T0 + 10 * YEAR,
        )
        for d in range(DISPATCHERS)
    ]
    common += [
        issue_key(
            root,
            principal_id=f"approver-{a}",
            kind="approver",
            signature_suite="ed25519",
            not_before=T0 - YEAR,
            not_after=T0 + 10 * YEAR,
        )
        for a in range(APPROVERS)
    ]
    public_doc = {
        "key_id": root.public.key_id,
        "suite": root.public.suite,
        "public_keys": root.public.public_keys,
    }
    private = root.key_file().private_keys
    step = 20_000
    chunks = [(private, public_doc, s, min(s + step, n)) for s in range(0, n, step)]
    values: list[bytes] = []
    with ProcessPoolExecutor(max_workers=2) as pool:
        for part in pool.map(_sign_chunk, chunks):
            values.extend(part)
    records = [c.signed for c in common] + [SignedKeyRecord.from_cbor(v) for v in values]
    head = root.sign_head(
        build_head(
            (r.record for r in records), seq=1, at=T0, vehicle_buckets=DEFAULT_VEHICLE_BUCKETS
        )
    )
    save_key_file(KeyFolder(folder).root_key, root.key_file())
    KeyFolder(folder).root_pub.write_bytes(root.public.to_bytes())
    for item in common:
        save_key_file(KeyFolder(folder).private_key(item.key_file.principal_id), item.key_file)
    # Last: its presence means the fleet is complete.
    write_directory_file(KeyFolder(folder).directory, head, records)
    print(f"generated fleet {n} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return folder


# --- measurements, each in a child process -------------------------------------------------


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(mode: str, n: int) -> dict[str, Any]:
    from fleetbus.sdk.vehicle import load_key_directory

    folder = fleet_folder(n)
    root = RootPublicKey.from_bytes(KeyFolder(folder).root_pub.read_bytes())
    base = rss_mb()
    started = time.perf_counter()
    if mode == "agent":
        directory = load_key_directory(
            folder, state_dir=CACHE / "state-none", vehicles=["V-0000001"]
        )
    elif mode.startswith("worker-share-"):
        # A seal stage holding K of the 16 partitions of commands.authorized: set 0 and the
        # K buckets those partitions are (bucket = partition, docs/key-management.md).
        share = int(mode.rsplit("-", 1)[1])
        directory = load_directory(
            KeyFolder(folder).directory, root, scope=DirectoryScope(frozenset(range(share)))
        )
    else:
        directory = load_directory(
            KeyFolder(folder).directory, root, verify_each=mode == "worker-verify-each"
        )
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "mode": mode,
        "vehicles": n,
        "code": os.environ.get("BENCH_CODE", "this"),
        "start_s": round(seconds, 3),
        # Before anything below parses what the directory holds.
        "rss_mb": round(rss_mb(), 1),
        "rss_growth_mb": round(rss_mb() - base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    if mode == "worker" or mode.startswith("worker-share-"):
        rng = random.Random(7)  # noqa: S311 - which vehicles to look up
        ids = [vehicle_id(rng.randrange(n)) for _ in range(20_000)]
        if mode != "worker":
            ids = [v for v in ids if directory.wants(v, "vehicle")]
        t = time.perf_counter()
        for vid in ids:
            directory.recipient_keys(vid, at=T0)
        out["recipient_keys_us"] = round((time.perf_counter() - t) / len(ids) * 1e6, 2)
        # The same 500 vehicles again and again (a seal stage's busy vehicles).
        hot = ids[:500] * 40
        t = time.perf_counter()
        for vid in hot:
            directory.recipient_keys(vid, at=T0)
        out["recipient_keys_hot_us"] = round((time.perf_counter() - t) / len(hot) * 1e6, 2)
        out["rss_after_lookups_mb"] = round(rss_mb(), 1)
        kid = directory.latest("dispatch-3").key_id
        t = time.perf_counter()
        for _ in range(20_000):
            directory.verifier_for("dispatch-3", kid, at=T0)
        out["verifier_for_us"] = round((time.perf_counter() - t) / 20_000 * 1e6, 2)
    if mode == "agent":
        signed = directory.signed_records()
        out["records_held"] = len(signed)
        out["state_bytes"] = sum(len(s.to_cbor()) for s in signed)
    else:
        # Principal by principal: a list of the fleet's parsed records would be 7 kB each.
        names = [vehicle_id(i) for i in range(n) if directory.wants(vehicle_id(i), "vehicle")]
        names += ["bus-sealer"] + [f"dispatch-{d}" for d in range(DISPATCHERS)]
        names += [f"approver-{a}" for a in range(APPROVERS)]
        out["records_held"] = sum(len(directory.records(name)) for name in names)
    if mode == "worker" and os.environ.get("BENCH_LISTING"):
        # What the worker's policy refresh asks at start and after every head: every record.
        t = time.perf_counter()
        listed = directory.records()
        out["records_listing_s"] = round(time.perf_counter() - t, 3)
        out["rss_with_listing_mb"] = round(rss_mb(), 1)
        del listed
    return out


def process_child(mode: str, n: int) -> dict[str, Any]:
    """A whole worker process built as ``fleetbus worker`` builds it (``build_pipeline``: key
    directory, roster, fleet registry, Cedar entities, stages), then serving ``K`` of 16
    partitions (``process-share-K``, ``directory_scope`` partitions) or the whole fleet
    (``process-fleet``). The key topic's re-read at an assignment is left out (no broker
    here; ``--rebalance`` times it): this is the start-up from local files, then a group
    command's expansion and a Cedar decision as the stages would ask them."""
    import tempfile

    from fleetbus.bus.settings import FleetbusSettings
    from fleetbus.processors.app import build_pipeline

    folder = fleet_folder(n)
    share = None if mode == "process-fleet" else int(mode.rsplit("-", 1)[1])
    settings = FleetbusSettings(
        kafka_bootstrap="127.0.0.1:1",  # building connects to nothing
        keys_dir=str(folder),
        sealer_principal="bus-sealer",
        partitions=DEFAULT_VEHICLE_BUCKETS,
        directory_scope="fleet" if share is None else "partitions",
        data_dir=tempfile.mkdtemp(prefix="bench-process-"),
    )
    base = rss_mb()
    started = time.perf_counter()
    pipeline = build_pipeline(settings)
    built = time.perf_counter() - started
    stages = {runner.stage: runner for runner in pipeline.stages}
    if share is not None:
        buckets = stages["seal"]._listener
        buckets.reread_topic = lambda follower: None
        buckets.reconcile(frozenset(range(share)))
    seconds = time.perf_counter() - started
    out: dict[str, Any] = {
        "mode": mode,
        "vehicles": n,
        "code": os.environ.get("BENCH_CODE", "this"),
        "build_s": round(built, 3),
        "start_s": round(seconds, 3),
        "rss_mb": round(rss_mb(), 1),
        "rss_growth_mb": round(rss_mb() - base, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    seal, authorize = stages["seal"].logic, stages["authorize"].logic
    # A group command on partition 0 (held in every mode): its members there.
    t = time.perf_counter()
    members = seal.group_members("depot-07", 0, DEFAULT_VEHICLE_BUCKETS)
    out["group_expand_s"] = round(time.perf_counter() - t, 4)
    out["group_members_p0"] = len(members)
    policy = authorize.policy
    rng = random.Random(11)  # noqa: S311 - which vehicles to decide for
    ids = [vehicle_id(rng.randrange(n)) for _ in range(2_000)]
    t = time.perf_counter()
    for vid in ids:
        policy.decide_command(
            issuer="dispatch-3",
            action="lock_doors",
            vehicle=vid,
            group=None,
            approvals=0,
            required_approvals=2,
            now=T0,
        )
    out["decide_vehicle_us"] = round((time.perf_counter() - t) / len(ids) * 1e6, 1)
    lookup = getattr(policy.registry, "vehicle", None)  # None: a baseline's dict registry
    if lookup is not None:
        t = time.perf_counter()
        for vid in ids:
            lookup(vid)
        out["registry_lookup_us"] = round((time.perf_counter() - t) / len(ids) * 1e6, 1)
    out["rss_after_mb"] = round(rss_mb(), 1)
    out["peak_rss_after_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def run_child(mode: str, n: int, baseline: Path | None = None) -> dict[str, Any]:
    """One measurement in a fresh process; with ``baseline`` (a folder holding another
    commit's ``fleetbus`` package), with that code instead of this checkout's."""
    env = dict(os.environ)
    if baseline is not None:
        env["PYTHONPATH"] = str(baseline)
        env["BENCH_CODE"] = baseline.name
    proc = subprocess.run(  # noqa: S603 - this script, with its own arguments
        [sys.executable, __file__, "--child", mode, "--sizes", str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# --- revocation propagation on a real broker ----------------------------------------------


def follower_process(role: str, n: int, bootstrap: str, prefix: str, readers: int) -> None:
    """A worker (whole fleet) or ``readers`` vehicle agents (set 0 each) following the topic;
    prints ``{"kid", "at"}`` for every revocation in force, per reader."""
    from fleetbus.bus.directory import vehicle_agent_scope
    from fleetbus.bus.settings import FleetbusSettings, TopicNames
    from fleetbus.sdk.keytopic import KeyTopicFollower, KeyTopicReader

    folder = fleet_folder(n)
    root = RootPublicKey.from_bytes(KeyFolder(folder).root_pub.read_bytes())
    settings = FleetbusSettings(kafka_bootstrap=bootstrap, topics=TopicNames(prefix=prefix))
    scope = vehicle_agent_scope(["V-0000001"]) if role == "agent" else None
    started = []
    for _ in range(readers):
        directory = (
            load_directory(KeyFolder(folder).directory, root, scope=scope)
            if scope is not None
            else load_directory(KeyFolder(folder).directory, root)
        )
        reader = KeyTopicReader(settings, KeyTopicFollower(directory, role=role))
        reader.start()
        started.append((reader, directory))
    kids = {directory.latest(f"dispatch-{d}").key_id for d in range(DISPATCHERS)}
    seen: list[set[str]] = [set() for _ in started]
    print(json.dumps({"ready": role, "readers": readers}), flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and any(len(s) < len(kids) for s in seen):
        for index, (reader, directory) in enumerate(started):
            reader.poll(0.0 if readers > 1 else 0.05)
            for kid in kids - seen[index]:
                record = directory.record(kid)
                if record is not None and record.revoked:
                    seen[index].add(kid)
                    print(json.dumps({"kid": kid, "at": time.time(), "role": role}), flush=True)
        if readers > 1:
            time.sleep(0.005)


@contextlib.contextmanager
def key_topic_broker() -> Iterator[tuple[Any, Any, str]]:
    """A local broker with a compacted key topic under a fresh prefix: ``(cluster, settings,
    prefix)``; the broker is stopped on exit."""
    import uuid

    from fleetbus.bus.settings import FleetbusSettings, TopicNames
    from fleetbus.bus.topics import ensure_topics
    from fleetbus.devtools.kafka import LocalKafka, find_free_base_port

    cluster = LocalKafka(home=CACHE / "kafka", base_port=find_free_base_port(2), heap_mb=768)
    cluster.up(timeout_s=180)
    try:
        prefix = f"b{uuid.uuid4().hex[:8]}."
        settings = FleetbusSettings(
            kafka_bootstrap=cluster.bootstrap, topics=TopicNames(prefix=prefix)
        )
        topic = settings.topics.full(settings.topics.keys)
        ensure_topics(
            cluster.bootstrap, [topic], partitions=2, configs={"cleanup.policy": "compact"}
        )
        yield cluster, settings, prefix
    finally:
        cluster.down()


def _kill_all(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def propagation(n: int, revocations: int) -> dict[str, Any]:
    import threading

    from fleetbus.bus.directory import next_head
    from fleetbus.sdk.keytopic import publish_key_change

    folder = fleet_folder(n)
    root = FleetRoot.from_key_file(load_key_file(KeyFolder(folder).root_key))
    # The head and set 0 parsed; the root holder's whole directory held by position (parsed
    # whole, 10^6 records would be ~7 GB of objects).
    content = read_directory_file(
        KeyFolder(folder).directory, scope=DirectoryScope(buckets=frozenset())
    )
    assert content.head is not None
    holder = load_directory(KeyFolder(folder).directory, root.public)
    procs: list[subprocess.Popen[str]] = []
    with key_topic_broker() as (cluster, settings, prefix), contextlib.ExitStack() as stack:
        stack.callback(_kill_all, procs)
        # The topic holds set 0 and the head; the workers load the vehicles from the file.
        common = [s for s in content.records if s.record.kind != "vehicle"]
        publish_key_change(settings, common, content.head)
        layout = [("worker", 1), ("worker", 1), ("agent", 50), ("agent", 50)]
        for role, readers in layout:
            command = [sys.executable, __file__, "--follow", role, "--sizes", str(n)]
            command += ["--bootstrap", cluster.bootstrap, "--prefix", prefix]
            procs.append(
                subprocess.Popen(  # noqa: S603 - this script, with its own arguments
                    [*command, "--readers", str(readers)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        lines: list[dict[str, Any]] = []
        lock = threading.Lock()

        def pump(proc: subprocess.Popen[str]) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                with lock:
                    lines.append(json.loads(line))

        for proc in procs:
            threading.Thread(target=pump, args=(proc,), daemon=True).start()
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            with lock:
                if sum(1 for line in lines if "ready" in line) == len(layout):
                    break
            time.sleep(0.2)
        published: dict[str, float] = {}
        previous = content.head.head
        for d in range(revocations):
            record = holder.latest(f"dispatch-{d}")
            revocation = root.sign(record.revocation(at=time.time()))
            holder.ingest(revocation)
            head = next_head(root, holder, previous=previous)
            holder.ingest_head(head)
            previous = head.head
            published[record.key_id] = time.time()
            publish_key_change(settings, [revocation], head)
            time.sleep(1.0)
        expected = revocations * (2 + 100)
        while time.monotonic() < deadline:
            with lock:
                done = [line for line in lines if line.get("kid") in published]
            if len(done) >= expected:
                break
            time.sleep(0.2)
        samples: dict[str, list[float]] = {"worker": [], "agent": []}
        for line in done:
            samples[line["role"]].append(line["at"] - published[line["kid"]])
        return {
            "vehicles": n,
            "revocations": revocations,
            "workers": 2,
            "vehicle_agents": 100,
            "in_force_samples": len(done),
            "expected_samples": expected,
            **{f"{role}_in_force_s": summary(values) for role, values in samples.items() if values},
        }


def scoped_worker(n: int, bootstrap: str, prefix: str, margin: float) -> dict[str, Any]:
    """A ``directory_scope=partitions`` worker's directory through bucket changes (a child),
    reading the key topic from the file's head less ``margin`` (negative: the whole topic)."""
    import tempfile

    from fleetbus.bus.settings import FleetbusSettings, TopicNames
    from fleetbus.processors.app import load_worker_directory
    from fleetbus.processors.keytopic import KeyTopicService, PartitionBuckets

    folder = fleet_folder(n)
    path = KeyFolder(folder).directory
    root = RootPublicKey.from_bytes(KeyFolder(folder).root_pub.read_bytes())
    settings = FleetbusSettings(
        kafka_bootstrap=bootstrap,
        topics=TopicNames(prefix=prefix),
        partitions=DEFAULT_VEHICLE_BUCKETS,
        directory_scope="partitions",
        data_dir=tempfile.mkdtemp(prefix="bench-scope-"),
        key_topic_read_margin_s=margin,
    )
    base = rss_mb()
    started = time.perf_counter()
    directory, roster = load_worker_directory(settings, root, path)
    loaded = time.perf_counter()
    service = KeyTopicService(settings, directory, roster=roster)
    service.catch_up(timeout_s=1800)
    out: dict[str, Any] = {
        "vehicles": n,
        "read": "whole topic" if margin < 0 else f"from the file's head - {margin:.0f} s",
        "start_s": round(time.perf_counter() - started, 3),
        "catch_up_s": round(time.perf_counter() - loaded, 3),
        "start_rss_mb": round(rss_mb(), 1),
    }
    buckets = PartitionBuckets(settings, directory, path, roster=roster, topic_timeout_s=1800)
    reread = buckets.reread_topic
    spent: list[float] = []

    def timed(follower: Any) -> None:
        t = time.perf_counter()
        reread(follower)
        spent.append(time.perf_counter() - t)

    buckets.reread_topic = timed  # type: ignore[method-assign]
    steps = [("take_1", {0}), ("take_3_more", {0, 1, 2, 3}), ("drop_3", {0})]
    for name, wanted in steps:
        spent.clear()
        t = time.perf_counter()
        buckets.reconcile(frozenset(wanted))
        total = time.perf_counter() - t
        out[name] = {
            "s": round(total, 3),
            "topic_reread_s": round(sum(spent), 3),
            "file_s": round(total - sum(spent), 3),
            "vehicles_held": directory.vehicles_held(),
            "rss_mb": round(rss_mb(), 1),
        }
    out["rss_growth_mb"] = round(rss_mb() - base, 1)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def rebalance(n: int) -> dict[str, Any]:
    """``scoped_worker`` in a child process, against a local broker holding the fleet's topic."""

    from kafka import KafkaProducer

    from fleetbus.bus.directory import head_to_kafka, open_directory_file
    from fleetbus.bus.directory.records import signed_record_fields

    folder = fleet_folder(n, check_head=True)
    path = KeyFolder(folder).directory
    results = []
    with key_topic_broker() as (cluster, settings, prefix):
        # The whole fleet on the topic, as `keys issue --bootstrap` leaves it: every record
        # published (a day) before the root signed the head of the file the workers load,
        # with the file's head last. Streamed: the records' bytes are sent as stored.
        started = time.perf_counter()
        producer = KafkaProducer(bootstrap_servers=cluster.bootstrap, linger_ms=20)
        topic = settings.topics.full(settings.topics.keys)
        count = 0
        with open_directory_file(path) as stream:
            assert stream.head is not None
            # (The synthetic head's time may be ahead of the clock; Kafka refuses timestamps
            # more than an hour ahead.)
            stamp = int((min(stream.head.head.issued_at, time.time()) - 86400) * 1000)
            for item in stream.records:
                principal, _, key_id, _ = signed_record_fields(item.data)
                key = f"{principal}/{key_id}".encode()  # bus.directory.kafka_key
                producer.send(topic, key=key, value=item.data, partition=0, timestamp_ms=stamp)
                count += 1
            producer.flush()
            key, value = head_to_kafka(stream.head)
            producer.send(topic, key=key, value=value, partition=0, timestamp_ms=stamp).get(60)
        producer.close()
        published_s = time.perf_counter() - started
        for margin in (3600.0, -1.0):
            command = [sys.executable, __file__, "--scoped", str(n), "--margin", str(margin)]
            proc = subprocess.run(  # noqa: S603 - this script, with its own arguments
                [*command, "--bootstrap", cluster.bootstrap, "--prefix", prefix],
                capture_output=True,
                text=True,
                check=True,
            )
            result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
            result["topic_records"] = count + 1
            result["publish_s"] = round(published_s, 1)
            results.append(result)
    return results


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 4)

    return {"p50": q(0.5), "p99": q(0.99), "max": round(ordered[-1], 4)}


def _merged(
    old: list[dict[str, Any]], new: list[dict[str, Any]], key: tuple[str, ...]
) -> list[dict[str, Any]]:
    replaced = {tuple(row[k] for k in key) for row in new}
    kept = [row for row in old if tuple(row[k] for k in key) not in replaced]
    return sorted(kept + new, key=lambda row: tuple(row[k] for k in key[::-1]))


def baseline_tree(rev: str) -> Path:
    """``rev``'s ``fleetbus`` package extracted under the cache (a path entry that shadows
    this checkout's editable install)."""
    import io
    import shutil
    import tarfile

    git = shutil.which("git")
    assert git is not None
    here = Path(__file__).resolve().parent.parent  # the repository (archive is per folder)

    def run(*args: str) -> bytes:
        return subprocess.run([git, *args], capture_output=True, check=True, cwd=here).stdout  # noqa: S603

    sha = run("rev-parse", "--short", rev).decode().strip()
    tree = CACHE / "code" / sha
    if not (tree / "fleetbus").exists():
        with tarfile.open(fileobj=io.BytesIO(run("archive", sha))) as archive:
            archive.extractall(tree / "fleetbus", filter="data")
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--verify-each-max", type=int, default=100_000)
    parser.add_argument(
        "--propagation",
        default="",
        help="fleet sizes (comma separated) at which to measure revocation propagation",
    )
    parser.add_argument("--revocations", type=int, default=10)
    parser.add_argument(
        "--shares",
        default="",
        help="partition shares (of 16, comma separated) a seal stage serves, e.g. 1,2,8",
    )
    parser.add_argument(
        "--process-shares",
        default="",
        help="partition shares (of 16) at which to start a whole worker process (build_pipeline)",
    )
    parser.add_argument(
        "--process-fleet",
        action="store_true",
        help="also start a whole worker process with directory_scope fleet",
    )
    parser.add_argument(
        "--rebalance",
        default="",
        help="fleet sizes (comma separated) at which to measure a scoped worker's bucket moves",
    )
    parser.add_argument(
        "--baseline",
        default="",
        help="also measure start-ups with this git revision's code (e.g. the branch point)",
    )
    parser.add_argument(
        "--listing",
        action="store_true",
        help="also time the worker's listing of every record (directory.records())",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--scoped", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rehead", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--follow", help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--margin", type=float, default=3600.0, help=argparse.SUPPRESS)
    parser.add_argument("--readers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if args.child:
        measure = process_child if args.child.startswith("process-") else child
        print(json.dumps(measure(args.child, sizes[0])))
        return
    if args.scoped:
        print(json.dumps(scoped_worker(args.scoped, args.bootstrap, args.prefix, args.margin)))
        return
    if args.rehead:
        rehead(fleet_folder(sizes[0]))
        return
    if args.follow:
        follower_process(args.follow, sizes[0], args.bootstrap, args.prefix, args.readers)
        return
    rows = []
    baseline = baseline_tree(args.baseline) if args.baseline else None
    if args.listing:
        os.environ["BENCH_LISTING"] = "1"
    shares = [f"worker-share-{k}" for k in args.shares.split(",") if k]
    shares += [f"process-share-{k}" for k in args.process_shares.split(",") if k]
    shares += ["process-fleet"] if args.process_fleet else []
    for n in sizes:
        fleet_folder(n, check_head=True)
        modes = ["worker", "agent"] + (["worker-verify-each"] if n <= args.verify_each_max else [])
        modes += shares
        for mode in modes:
            for code in [None, baseline] if baseline is not None else [None]:
                if code is not None and mode == "worker-verify-each":
                    continue
                row = run_child(mode, n, code)
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    moves = [row for n in (int(s) for s in args.rebalance.split(",") if s) for row in rebalance(n)]
    for item in moves:
        print(f"scoped worker at {item['vehicles']}: {json.dumps(item)}")
    prop_sizes = [int(s) for s in args.propagation.split(",") if s]
    prop = [propagation(n, args.revocations) for n in prop_sizes]
    print(
        f"{'mode':<20} {'code':<8} {'vehicles':>9} {'start s':>8} {'RSS MB':>8} {'held':>9} "
        f"{'state MB':>9}"
    )
    processes = [row for row in rows if row["mode"].startswith("process-")]
    for row in (row for row in rows if row not in processes):
        print(
            f"{row['mode']:<20} {row['code']:<8} {row['vehicles']:>9} {row['start_s']:>8} "
            f"{row['rss_mb']:>8} {row['records_held']:>9} "
            + (f"{row['state_bytes'] / 2**20:>9.2f}" if "state_bytes" in row else f"{'-':>9}")
        )
    for row in rows:
        if "recipient_keys_us" in row:
            print(
                f"lookups, {row['mode']} {row['code']} at {row['vehicles']}: recipient_keys "
                f"{row['recipient_keys_us']} us (the same 500 vehicles: "
                f"{row['recipient_keys_hot_us']} us), verifier_for {row['verifier_for_us']} us"
            )
    if processes:
        print(
            f"\n{'whole worker process':<20} {'code':<8} {'vehicles':>9} {'start s':>8} "
            f"{'RSS MB':>8} {'peak MB':>8} {'decide us':>10} {'group expand s':>15}"
        )
    for row in processes:
        print(
            f"{row['mode']:<20} {row['code']:<8} {row['vehicles']:>9} {row['start_s']:>8} "
            f"{row['rss_mb']:>8} {row['peak_rss_mb']:>8} {row['decide_vehicle_us']:>10} "
            f"{row['group_expand_s']:>15}"
        )
    for item in prop:
        print(f"propagation at {item['vehicles']}: {json.dumps(item)}")
    RESULTS.parent.mkdir(exist_ok=True)
    previous = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    doc = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "root": "ed25519 (synthetic fleet; see the module docstring)",
        # A run over some sizes replaces those rows and keeps the others.
        "rows": _merged(
            [{"code": "earlier", **row} for row in previous.get("rows", [])],
            rows,
            ("mode", "code", "vehicles"),
        ),
        "propagation": _merged(previous.get("propagation", []), prop, ("vehicles",)),
        "scoped_worker": _merged(
            [{"read": "whole topic", **row} for row in previous.get("scoped_worker", [])],
            moves,
            ("vehicles", "read"),
        ),
    }
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
