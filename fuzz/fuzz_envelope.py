"""Fuzz the envelope parser and opener: ``decode_envelope``, ``decode_protected`` and
``EnvelopeOpener.open`` (the corpus fleet's bus sealer, fixed clock).

A crash is: any exception other than ``EnvelopeError``; an ``EnvelopeError`` that hides an
internal exception ("unexpected ..."); or an accepted envelope that does not re-encode to the
same bytes (the parser must accept exactly the canonical encoding). See fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fleetbus.bus.keyfolder import KeyFolder

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import Crash, instrumented, main, note

with instrumented():
    from fleetbus.bus.directory import PrincipalKeyFile, RootPublicKey, load_directory
    from fleetbus.bus.envelope import (
        EnvelopeError,
        decode_envelope,
        decode_protected,
        encode_envelope,
        encode_protected,
    )
    from fleetbus.bus.keys import KeyPath
    from fleetbus.bus.registry import load_key_provider
    from fleetbus.providers.keypath import KeyPathRunner
    from fleetbus.providers.sealing import EnvelopeOpener


FLEET = Path(__file__).resolve().parents[1] / "tests" / "vectors" / "hostile" / "fleet"
OPEN_AT = 1_800_000_000.0
TOPICS = ["hostile.commands.responses", "hostile.telemetry.raw", "hostile.commands.outbound"]


def _opener(principal: str, minimum: str) -> EnvelopeOpener:
    directory = load_directory(
        KeyFolder(FLEET).directory,
        RootPublicKey.from_bytes(KeyFolder(FLEET).root_pub.read_bytes()),
    )
    keys = PrincipalKeyFile.from_json(
        (KeyFolder(FLEET).private_key(principal)).read_bytes()
    ).key_set()
    runner = KeyPathRunner({n: load_key_provider(n) for n in ("x25519", "xwing")})
    return EnvelopeOpener(keys, directory, runner, KeyPath.parse(minimum), clock=lambda: OPEN_AT)


OPENERS = [
    _opener("bus-sealer", "xwing"),
    _opener("bus-sealer", "x25519"),
    _opener("V-0001", "xwing"),
]


def test_one_input(data: bytes) -> None:
    try:
        parsed = decode_envelope(data)
    except EnvelopeError as exc:
        parsed = None
        note(f"decode:{exc.reason.value}:{str(exc)[:40]}")
    if parsed is not None:
        if encode_envelope(parsed.protected, parsed.ciphertext, parsed.signature) != data:
            raise Crash("an accepted envelope does not re-encode to the same bytes")
        if encode_protected(parsed.header) != parsed.protected:
            raise Crash("an accepted protected header does not re-encode to the same bytes")
        try:
            decode_protected(parsed.protected)
        except EnvelopeError as exc:
            raise Crash("decode_protected rejects what decode_envelope accepted") from exc
    for opener in OPENERS:
        for topic in TOPICS[: 1 + (len(data) % len(TOPICS))]:
            try:
                opener.open(data, topic=topic)
            except EnvelopeError as exc:
                note(exc.reason.value)
                if str(exc).startswith("unexpected "):
                    raise Crash(f"open hid an internal error: {exc}") from exc


if __name__ == "__main__":
    main(test_one_input, "envelope")
