"""The ETSI GS QKD 014 KME simulator over real TLS, and the qkd-etsi014 provider against it.

Over 500 lines because it is the whole ETSI 014 interface and the provider against it, case by
case, on one real KME pair (its fixtures are in tests/support/fixtures_kme.py).
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import socket
import ssl
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from fleetbus.bus.errors import ReasonCode
from fleetbus.bus.keys import KeyProviderError, PrivateKeySet, RecipientKeys
from fleetbus.cli.kme import kme_app
from fleetbus.devtools.kme_pki import TestPKI
from tests.support.fixtures_kme import KMEPairUnderTest, start_kme_process, stop_kme_process

STATUS_FIELDS = {
    "source_KME_ID": str,
    "target_KME_ID": str,
    "master_SAE_ID": str,
    "slave_SAE_ID": str,
    "key_size": int,
    "stored_key_count": int,
    "max_key_count": int,
    "max_key_per_request": int,
    "max_key_size": int,
    "min_key_size": int,
    "max_SAE_ID_count": int,
}


@pytest.fixture(autouse=True)
def fresh_link(kme_pair: KMEPairUnderTest) -> Iterator[None]:
    """Every test starts, and leaves, the shared link in its start state."""
    kme_pair.reset()
    yield
    kme_pair.reset()


def enc_path(slave: str) -> str:
    return f"/api/v1/keys/{slave}/enc_keys"


def dec_path(master: str) -> str:
    return f"/api/v1/keys/{master}/dec_keys"


def status_path(slave: str) -> str:
    return f"/api/v1/keys/{slave}/status"


def assert_error_body(data: dict[str, Any]) -> None:
    assert isinstance(data.get("message"), str)
    assert data["message"]
    assert "details" not in data or isinstance(data["details"], list)
    assert "key" not in data
    assert "keys" not in data


def enc(pair: KMEPairUnderTest, number: int = 1, size: int = 256) -> list[dict[str, str]]:
    status, data = pair.call(
        pair.kme_a_url,
        pair.master_sae,
        "POST",
        enc_path(pair.slave_sae),
        {"number": number, "size": size},
    )
    assert status == 200, data
    keys: list[dict[str, str]] = data["keys"]
    return keys


def stored(pair: KMEPairUnderTest) -> int:
    status, data = pair.call(pair.kme_a_url, pair.master_sae, "GET", status_path(pair.slave_sae))
    assert status == 200, data
    count: int = data["stored_key_count"]
    return count


# -- status -------------------------------------------------------------------------------


def test_status_get_has_every_standard_field(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "GET", status_path(kme_pair.slave_sae)
    )
    assert status == 200
    for name, typ in STATUS_FIELDS.items():
        assert isinstance(data[name], typ), name
    assert data["source_KME_ID"] == "KME-A"
    assert data["target_KME_ID"] == "KME-B"
    assert data["master_SAE_ID"] == kme_pair.master_sae
    assert data["slave_SAE_ID"] == kme_pair.slave_sae
    assert data["max_key_count"] == kme_pair.pool_keys
    assert data["stored_key_count"] == kme_pair.pool_keys
    assert data["max_SAE_ID_count"] == 0
    assert data["min_key_size"] <= data["key_size"] <= data["max_key_size"]


def test_status_post_is_not_a_014_method(kme_pair: KMEPairUnderTest) -> None:
    # 014 defines Get status as GET only; POST answers 405 with the 014 error body.
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "POST", status_path(kme_pair.slave_sae), {}
    )
    assert status == 405
    assert_error_body(data)


def test_status_from_the_slave_side_names_kme_b_as_source(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_b_url, kme_pair.slave_sae, "GET", status_path(kme_pair.master_sae)
    )
    assert status == 200
    assert (data["source_KME_ID"], data["target_KME_ID"]) == ("KME-B", "KME-A")
    assert data["master_SAE_ID"] == kme_pair.slave_sae


def test_status_for_unknown_slave_is_400(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "GET", status_path("sae-nobody")
    )
    assert status == 400
    assert_error_body(data)


# -- enc_keys / dec_keys ---------------------------------------------------------------------


def test_enc_then_dec_on_the_other_kme_returns_identical_keys(kme_pair: KMEPairUnderTest) -> None:
    keys = enc(kme_pair, number=3, size=512)
    assert len(keys) == 3
    assert len({k["key_ID"] for k in keys}) == 3
    for k in keys:
        uuid.UUID(k["key_ID"])  # 014 key_IDs are UUIDs
        assert len(base64.b64decode(k["key"], validate=True)) == 64
    status, data = kme_pair.call(
        kme_pair.kme_b_url,
        kme_pair.slave_sae,
        "POST",
        dec_path(kme_pair.master_sae),
        {"key_IDs": [{"key_ID": k["key_ID"]} for k in keys]},
    )
    assert status == 200, data
    assert {k["key_ID"]: k["key"] for k in data["keys"]} == {k["key_ID"]: k["key"] for k in keys}


def test_get_variants_of_enc_and_dec(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_a_url,
        kme_pair.master_sae,
        "GET",
        enc_path(kme_pair.slave_sae) + "?number=2&size=128",
    )
    assert status == 200, data
    assert len(data["keys"]) == 2
    first = data["keys"][0]
    assert len(base64.b64decode(first["key"])) == 16
    status, got = kme_pair.call(
        kme_pair.kme_b_url,
        kme_pair.slave_sae,
        "GET",
        dec_path(kme_pair.master_sae) + f"?key_ID={first['key_ID']}",
    )
    assert status == 200, got
    assert got["keys"] == [first]


def test_enc_defaults_to_one_key_of_key_size(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "GET", enc_path(kme_pair.slave_sae)
    )
    assert status == 200
    assert len(data["keys"]) == 1
    assert len(base64.b64decode(data["keys"][0]["key"])) == 32


def test_enc_never_returns_a_key_twice(kme_pair: KMEPairUnderTest) -> None:
    seen: set[str] = set()
    material: set[str] = set()
    for _ in range(5):
        for k in enc(kme_pair, number=4):
            assert k["key_ID"] not in seen
            assert k["key"] not in material
            seen.add(k["key_ID"])
            material.add(k["key"])


def test_second_dec_of_the_same_key_is_400(kme_pair: KMEPairUnderTest) -> None:
    (key,) = enc(kme_pair)
    body = {"key_IDs": [{"key_ID": key["key_ID"]}]}
    first, _ = kme_pair.call(
        kme_pair.kme_b_url, kme_pair.slave_sae, "POST", dec_path(kme_pair.master_sae), body
    )
    assert first == 200
    second, data = kme_pair.call(
        kme_pair.kme_b_url, kme_pair.slave_sae, "POST", dec_path(kme_pair.master_sae), body
    )
    assert second == 400
    assert_error_body(data)
    assert data["details"][0]["key_ID"] == key["key_ID"]


def test_unknown_key_id_is_400(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_b_url,
        kme_pair.slave_sae,
        "POST",
        dec_path(kme_pair.master_sae),
        {"key_IDs": [{"key_ID": str(uuid.uuid4())}]},
    )
    assert status == 400
    assert_error_body(data)


def test_another_slave_is_401_and_the_right_one_still_can_fetch_the_key(
    kme_pair: KMEPairUnderTest,
) -> None:
    (key,) = enc(kme_pair)
    body = {"key_IDs": [{"key_ID": key["key_ID"]}]}
    status, data = kme_pair.call(
        kme_pair.kme_b_url, kme_pair.other_slave_sae, "POST", dec_path(kme_pair.master_sae), body
    )
    # 014 clause 5.4, Table 7: an SAE that is not the key's slave is answered 401.
    assert status == 401
    assert_error_body(data)
    assert data["details"] == [{"key_ID": key["key_ID"], "reason": "not the slave SAE of this key"}]
    status, data = kme_pair.call(
        kme_pair.kme_b_url, kme_pair.slave_sae, "POST", dec_path(kme_pair.master_sae), body
    )
    assert status == 200
    assert data["keys"][0]["key"] == key["key"]


def test_master_cannot_fetch_its_key_as_slave_on_its_own_kme(kme_pair: KMEPairUnderTest) -> None:
    (key,) = enc(kme_pair)
    status, data = kme_pair.call(
        kme_pair.kme_a_url,
        kme_pair.master_sae,
        "POST",
        dec_path(kme_pair.slave_sae),
        {"key_IDs": [{"key_ID": key["key_ID"]}]},
    )
    assert status == 401  # the master is not the key's slave either
    assert_error_body(data)


def test_a_batch_with_one_bad_key_id_delivers_nothing(kme_pair: KMEPairUnderTest) -> None:
    (key,) = enc(kme_pair)
    good = {"key_ID": key["key_ID"]}
    bad = {"key_ID": str(uuid.uuid4())}
    status, _ = kme_pair.call(
        kme_pair.kme_b_url,
        kme_pair.slave_sae,
        "POST",
        dec_path(kme_pair.master_sae),
        {"key_IDs": [good, bad]},
    )
    assert status == 400
    status, data = kme_pair.call(
        kme_pair.kme_b_url,
        kme_pair.slave_sae,
        "POST",
        dec_path(kme_pair.master_sae),
        {"key_IDs": [good]},
    )
    assert status == 200
    assert data["keys"][0]["key"] == key["key"]


@pytest.mark.parametrize(
    "body",
    [
        {"number": 0},
        {"number": 65},
        {"number": "1"},
        {"size": 100},
        {"size": 8},
        {"size": 4096},
        {"additional_slave_SAE_IDs": ["sae-edge-2"]},
        {"extension_mandatory": [{"abc_route_type": "direct"}]},
        [1, 2],
    ],
)
def test_bad_enc_requests_are_400(kme_pair: KMEPairUnderTest, body: Any) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "POST", enc_path(kme_pair.slave_sae), body
    )
    assert status == 400
    assert_error_body(data)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"size": 100}, "size shall be a multiple of 8"),
        (
            {"extension_mandatory": [{"abc_route_type": "direct"}]},
            "not all extension_mandatory parameters are supported",
        ),
    ],
)
def test_refusals_carry_the_014_messages(
    kme_pair: KMEPairUnderTest, body: dict[str, Any], message: str
) -> None:
    # 014 clause 6.4 gives these two messages word for word; third-party clients match them.
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "POST", enc_path(kme_pair.slave_sae), body
    )
    assert (status, data["message"]) == (400, message)
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "GET", enc_path(kme_pair.slave_sae) + "?size=100"
    )
    assert (status, data["message"]) == (400, "size shall be a multiple of 8")


def test_bad_query_is_400(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "GET", enc_path(kme_pair.slave_sae) + "?number=x"
    )
    assert status == 400
    assert_error_body(data)


def test_enc_for_unknown_slave_is_400(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "POST", enc_path("sae-nobody"), {}
    )
    assert status == 400
    assert_error_body(data)


# -- identities and TLS ----------------------------------------------------------------------


def test_sae_not_attached_to_the_kme_is_401(kme_pair: KMEPairUnderTest) -> None:
    # sae-edge-1 lives behind KME-B; it may not draw keys from KME-A.
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.slave_sae, "POST", enc_path(kme_pair.master_sae), {}
    )
    assert status == 401
    assert_error_body(data)


def test_sae_with_a_valid_cert_but_no_registration_is_401(kme_pair: KMEPairUnderTest) -> None:
    for url, path in (
        (kme_pair.kme_a_url, status_path(kme_pair.slave_sae)),
        (kme_pair.kme_b_url, dec_path(kme_pair.master_sae) + f"?key_ID={uuid.uuid4()}"),
    ):
        status, data = kme_pair.call(url, "sae-outsider", "GET", path)
        assert status == 401
        assert_error_body(data)


def _raw_request(url: str, ctx: ssl.SSLContext) -> int:
    host, port = url.removeprefix("https://").split(":")
    conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
    try:
        conn.request("GET", "/api/v1/keys/sae-edge-1/status")
        return conn.getresponse().status
    finally:
        conn.close()


def test_client_without_certificate_fails_tls(kme_pair: KMEPairUnderTest) -> None:
    ctx = kme_pair.client_context(None)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _raw_request(kme_pair.kme_a_url, ctx)


def test_client_certificate_from_another_ca_fails_tls(
    kme_pair: KMEPairUnderTest, kme_foreign_pki: TestPKI
) -> None:
    ctx = kme_pair.client_context(None)  # trusts the right CA for the server ...
    foreign = kme_foreign_pki.saes[kme_pair.master_sae]  # ... but presents a foreign cert
    ctx.load_cert_chain(str(foreign.cert), str(foreign.key))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _raw_request(kme_pair.kme_a_url, ctx)


def test_server_not_signed_by_our_ca_is_rejected_by_the_provider(
    kme_pair: KMEPairUnderTest, kme_foreign_pki: TestPKI
) -> None:
    sender = kme_pair.provider("a", ca_file=kme_foreign_pki.ca_cert)
    with pytest.raises(KeyProviderError) as err:
        sender.status(kme_pair.slave_sae)
    assert err.value.reason is ReasonCode.CONFIG


# -- link, eavesdropper, key rate -------------------------------------------------------------


def test_link_down_is_503_with_standard_body_and_provider_raises_qkd_unavailable(
    kme_pair: KMEPairUnderTest,
) -> None:
    (pending,) = enc(kme_pair)
    state = kme_pair.admin("POST", "/admin/link", {"up": False})
    assert state["link_up"] is False
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "POST", enc_path(kme_pair.slave_sae), {}
    )
    assert status == 503
    assert_error_body(data)
    assert data["details"][0]["reason"] == "link_down"
    status, _ = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "GET", status_path(kme_pair.slave_sae)
    )
    assert status == 503

    sender, receiver = kme_pair.provider("a"), kme_pair.provider("b")
    recipient = RecipientKeys("edge", {}, {}, qkd_sae_id=kme_pair.slave_sae)
    with pytest.raises(KeyProviderError) as err:
        sender.establish(recipient, context=b"ctx")
    assert err.value.reason is ReasonCode.QKD_UNAVAILABLE
    assert sender.healthy() is False
    own = PrivateKeySet("edge", {}, qkd_sae_id=kme_pair.slave_sae)
    with pytest.raises(KeyProviderError) as err:
        receiver.recover(pending["key_ID"].encode(), pending["key_ID"], own, context=b"ctx")
    assert err.value.reason is ReasonCode.QKD_UNAVAILABLE

    kme_pair.admin("POST", "/admin/link", {"up": True})
    # The key reserved before the outage is still there for its slave afterwards.
    assert receiver.recover(pending["key_ID"].encode(), "", own, context=b"ctx") == (
        base64.b64decode(pending["key"])
    )
    assert sender.establish(recipient, context=b"ctx").shared_secret
    assert sender.healthy() is True


def test_eavesdropper_stops_new_keys_until_the_pool_drains(kme_pair: KMEPairUnderTest) -> None:
    state = kme_pair.admin("POST", "/admin/eavesdropper", {"on": True})
    assert state["qber"] > state["qber_threshold"]
    assert state["generating"] is False
    left = stored(kme_pair)
    assert left > 0  # without the flush option, distilled keys stay usable
    enc(kme_pair, number=left)
    status, data = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "POST", enc_path(kme_pair.slave_sae), {}
    )
    assert status == 503
    assert_error_body(data)
    assert data["details"][0]["reason"] == "eavesdropper_detected"
    assert stored(kme_pair) == 0  # nothing new was distilled meanwhile

    kme_pair.admin("POST", "/admin/eavesdropper", {"on": False})
    assert _poll(lambda: stored(kme_pair) > 0)


def test_pool_does_not_refill_at_rate_zero_and_refills_to_its_bound_at_a_high_rate(
    kme_pair: KMEPairUnderTest,
) -> None:
    kme_pair.admin("POST", "/admin/key-rate", {"bits_per_second": 0})
    enc(kme_pair, number=stored(kme_pair))
    for _ in range(3):
        assert stored(kme_pair) == 0
        status, data = kme_pair.call(
            kme_pair.kme_a_url, kme_pair.master_sae, "POST", enc_path(kme_pair.slave_sae), {}
        )
        assert status == 503
        assert data["details"][0]["reason"] == "key_pool_empty"
    kme_pair.admin("POST", "/admin/key-rate", {"bits_per_second": 1e9})
    assert _poll(lambda: stored(kme_pair) == kme_pair.pool_keys)
    assert stored(kme_pair) == kme_pair.pool_keys  # and never above the bound


def _poll(check: Any, attempts: int = 100) -> bool:
    for _ in range(attempts):
        if check():
            return True
        time.sleep(0.05)
    return False


# -- any conformant 014 client -----------------------------------------------------------------


def test_a_third_party_style_client_with_every_optional_field(kme_pair: KMEPairUnderTest) -> None:
    request = {
        "number": 2,
        "size": 256,
        "additional_slave_SAE_IDs": [],
        "extension_mandatory": [],
        "extension_optional": [{"abc_route_type": "direct"}],
    }
    status, container = kme_pair.call(
        kme_pair.kme_a_url, kme_pair.master_sae, "POST", enc_path(kme_pair.slave_sae), request
    )
    assert status == 200
    assert set(container) == {"keys"}
    for key in container["keys"]:
        assert {"key_ID", "key"} <= set(key)
    key_ids = {
        "key_IDs": [{"key_ID": k["key_ID"]} for k in container["keys"]],
        "key_IDs_extension": {},
    }
    status, got = kme_pair.call(
        kme_pair.kme_b_url, kme_pair.slave_sae, "POST", dec_path(kme_pair.master_sae), key_ids
    )
    assert status == 200
    assert got == container


def test_unknown_path_answers_with_an_error_body(kme_pair: KMEPairUnderTest) -> None:
    status, data = kme_pair.call(kme_pair.kme_a_url, kme_pair.master_sae, "GET", "/api/v2/keys")
    assert status == 404
    assert_error_body(data)


# -- the qkd-etsi014 provider ------------------------------------------------------------------


def test_provider_establishes_and_recovers_identical_secrets(kme_pair: KMEPairUnderTest) -> None:
    sender, receiver = kme_pair.provider("a"), kme_pair.provider("b")
    recipient = RecipientKeys("edge", {}, {}, qkd_sae_id=kme_pair.slave_sae)
    own = PrivateKeySet("edge", {}, qkd_sae_id=kme_pair.slave_sae)
    enc_ = sender.establish(recipient, context=b"transcript")
    assert enc_.provider == "qkd-etsi014"
    assert enc_.key_ref == enc_.key_id.encode()
    assert len(enc_.shared_secret) == 32
    assert enc_.shared_secret.hex() not in repr(enc_)
    secret = receiver.recover(enc_.key_ref, enc_.key_id, own, context=b"transcript")
    assert secret == enc_.shared_secret
    assert receiver.healthy() is True
    with pytest.raises(KeyProviderError) as err:
        receiver.recover(enc_.key_ref, enc_.key_id, own, context=b"transcript")
    assert err.value.reason is ReasonCode.UNKNOWN_KEY_ID
    assert enc_.shared_secret.hex() not in str(err.value)


def test_provider_fails_fast_on_an_empty_pool(kme_pair: KMEPairUnderTest) -> None:
    kme_pair.admin("POST", "/admin/key-rate", {"bits_per_second": 0})
    kme_pair.admin("POST", "/admin/flush", {})
    sender = kme_pair.provider("a")
    before = kme_pair.admin("GET", "/admin/state")["delivered"]
    with pytest.raises(KeyProviderError) as err:
        sender.establish(RecipientKeys("edge", {}, {}, qkd_sae_id=kme_pair.slave_sae), context=b"")
    assert err.value.reason is ReasonCode.QKD_UNAVAILABLE
    assert kme_pair.admin("GET", "/admin/state")["delivered"] == before


def test_provider_needs_the_recipients_sae_id(kme_pair: KMEPairUnderTest) -> None:
    with pytest.raises(KeyProviderError, match="recipient has no QKD SAE id") as err:
        kme_pair.provider("a").establish(RecipientKeys("car-7", {}, {}), context=b"")
    assert err.value.reason is ReasonCode.KEY_PROVIDER_FAILED


def test_provider_maps_401_from_status_to_config(kme_pair: KMEPairUnderTest) -> None:
    # A certificate of the KME's CA, but for an SAE attached to no KME.
    outsider = kme_pair.pki.saes["sae-outsider"]
    wrong = kme_pair.provider(
        "a", sae_id="sae-outsider", cert_file=outsider.cert, key_file=outsider.key
    )
    with pytest.raises(KeyProviderError, match="HTTP 401") as err:
        wrong.status(kme_pair.slave_sae)
    assert err.value.reason is ReasonCode.CONFIG


def test_provider_reports_a_key_of_another_slave_as_unknown_key_id(
    kme_pair: KMEPairUnderTest,
) -> None:
    sender = kme_pair.provider("a")
    enc_ = sender.establish(
        RecipientKeys("edge", {}, {}, qkd_sae_id=kme_pair.slave_sae), context=b""
    )
    other = kme_pair.pki.saes[kme_pair.other_slave_sae]
    thief = kme_pair.provider(
        "b", sae_id=kme_pair.other_slave_sae, cert_file=other.cert, key_file=other.key
    )
    own = PrivateKeySet("edge-2", {}, qkd_sae_id=kme_pair.other_slave_sae)
    with pytest.raises(KeyProviderError, match="HTTP 401") as err:
        thief.recover(enc_.key_ref, enc_.key_id, own, context=b"")
    # The envelope's key is not this SAE's: a message error, not a broken configuration.
    assert err.value.reason is ReasonCode.UNKNOWN_KEY_ID
    mine = PrivateKeySet("edge", {}, qkd_sae_id=kme_pair.slave_sae)
    assert kme_pair.provider("b").recover(enc_.key_ref, enc_.key_id, mine, context=b"") == (
        enc_.shared_secret
    )


def requests_at(pair: KMEPairUnderTest, kme_id: str) -> float:
    """014 requests the KME ``kme_id`` has answered so far, by its own counter."""
    total = 0.0
    for line in pair.metrics().splitlines():
        if line.startswith("fleetbus_qkd_kme_requests_total{") and f'kme="{kme_id}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_provider_pointed_at_the_other_kme_fails_before_sending_a_request(
    kme_pair: KMEPairUnderTest,
) -> None:
    # Same CA, same host, same SANs: only the KME ID in the certificate tells the KMEs apart
    # (014 clause 5.1). The check runs after the handshake and before the request, so no
    # key_ID reaches, and no key is drawn from, the wrong KME.
    (key,) = enc(kme_pair)
    before = requests_at(kme_pair, kme_pair.kme_a_id)
    receiver = kme_pair.provider("b", kme_url=kme_pair.kme_a_url)  # expects KME-B
    own = PrivateKeySet("edge", {}, qkd_sae_id=kme_pair.slave_sae)
    with pytest.raises(KeyProviderError) as err:
        receiver.recover(key["key_ID"].encode(), key["key_ID"], own, context=b"")
    assert err.value.reason is ReasonCode.CONFIG
    assert "KME ID 'KME-A', expected 'KME-B'" in str(err.value)
    assert receiver.healthy() is False
    assert requests_at(kme_pair, kme_pair.kme_a_id) == before

    before = requests_at(kme_pair, kme_pair.kme_b_id)
    sender = kme_pair.provider("a", kme_url=kme_pair.kme_b_url)  # expects KME-A
    with pytest.raises(KeyProviderError, match="KME ID 'KME-B', expected 'KME-A'") as err:
        sender.establish(RecipientKeys("e", {}, {}, qkd_sae_id=kme_pair.slave_sae), context=b"")
    assert err.value.reason is ReasonCode.CONFIG
    assert requests_at(kme_pair, kme_pair.kme_b_id) == before
    # A right URL with a wrong expectation fails the same way.
    with pytest.raises(KeyProviderError, match="expected 'KME-B'"):
        kme_pair.provider("a", kme_id=kme_pair.kme_b_id).status(kme_pair.slave_sae)


def test_provider_reports_refused_connection_as_qkd_unavailable(
    kme_pair: KMEPairUnderTest,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sender = kme_pair.provider("a", kme_url=f"https://127.0.0.1:{port}")
    with pytest.raises(KeyProviderError) as err:
        sender.establish(RecipientKeys("e", {}, {}, qkd_sae_id=kme_pair.slave_sae), context=b"")
    assert err.value.reason is ReasonCode.QKD_UNAVAILABLE
    assert sender.healthy() is False


def test_provider_reports_a_silent_kme_as_qkd_unavailable(kme_pair: KMEPairUnderTest) -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts TCP, never speaks TLS
        port = silent.getsockname()[1]
        sender = kme_pair.provider("a", kme_url=f"https://127.0.0.1:{port}", timeout_s=0.3)
        with pytest.raises(KeyProviderError) as err:
            sender.status(kme_pair.slave_sae)
    assert err.value.reason is ReasonCode.QKD_UNAVAILABLE


def test_qkd_provider_sides_fixture_round_trips(qkd_provider_sides: Any) -> None:
    sides = qkd_provider_sides
    assert sides.recipient.qkd_sae_id == "sae-edge-1"
    enc_ = sides.sender.establish(sides.recipient, context=b"c")
    assert sides.receiver.recover(enc_.key_ref, enc_.key_id, sides.own, context=b"c") == (
        enc_.shared_secret
    )


# -- admin port: metrics and the CLI switches ------------------------------------------------


def test_metrics_expose_the_pool_gauge(kme_pair: KMEPairUnderTest) -> None:
    kme_pair.admin("POST", "/admin/key-rate", {"bits_per_second": 0})
    enc(kme_pair, number=5)
    text = kme_pair.metrics()
    level = re.search(r"^fleetbus_qkd_key_pool_keys (\S+)$", text, re.MULTILINE)
    assert level is not None
    assert float(level.group(1)) == kme_pair.pool_keys - 5
    assert re.search(r"^fleetbus_qkd_link_up 1\.0$", text, re.MULTILINE)
    assert re.search(r"^fleetbus_qkd_key_rate_bytes_per_second 0\.0$", text, re.MULTILINE)
    assert re.search(r'^fleetbus_qkd_keys_delivered_total\{kme="KME-A"\} \d', text, re.MULTILINE)
    assert "fleetbus_qkd_qber " in text


def test_cli_switches_drive_the_admin_endpoint(kme_pair: KMEPairUnderTest) -> None:
    runner = CliRunner()
    result = runner.invoke(kme_app, ["link", "--down", "--admin-url", kme_pair.admin_url])
    assert result.exit_code == 0, result.output
    assert kme_pair.admin("GET", "/admin/state")["link_up"] is False
    result = runner.invoke(kme_app, ["eavesdropper", "--on", "--admin-url", kme_pair.admin_url])
    assert result.exit_code == 0, result.output
    assert kme_pair.admin("GET", "/admin/state")["eavesdropper"] is True
    result = runner.invoke(kme_app, ["link", "--up", "--admin-url", kme_pair.admin_url])
    assert result.exit_code == 0
    assert kme_pair.admin("GET", "/admin/state")["link_up"] is True


def test_serve_exits_zero_on_sigterm(kme_pki: TestPKI, tmp_path: Any) -> None:
    log = tmp_path / "kme.log"
    proc, urls, reader = start_kme_process(
        kme_pki.directory, log, "--sae-a", "sae-hub", "--sae-b", "sae-edge-1"
    )
    assert set(urls) == {"kme_a", "kme_b", "admin"}  # no metrics-only listener unless asked
    assert stop_kme_process(proc, reader) == 0
    assert "stopped" in log.read_text()


def test_admin_mtls_requires_the_admin_certificate(kme_pki: TestPKI, tmp_path: Any) -> None:
    log = tmp_path / "kme.log"
    proc, urls, reader = start_kme_process(
        kme_pki.directory, log, "--sae-a", "sae-hub", "--sae-b", "sae-edge-1", "--admin-mtls"
    )
    try:
        assert urls["admin"].startswith("https://127.0.0.1:")
        runner = CliRunner()
        denied = runner.invoke(kme_app, ["state", "--admin-url", urls["admin"]])
        assert denied.exit_code == 2
        allowed = runner.invoke(
            kme_app, ["state", "--admin-url", urls["admin"], "--tls-dir", str(kme_pki.directory)]
        )
        assert allowed.exit_code == 0, allowed.output
        assert '"link_up": true' in allowed.output
    finally:
        assert stop_kme_process(proc, reader) == 0


# -- metrics-only listener ----------------------------------------------------------------------


def _http(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request(method, parts.path or "/", body=body)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def test_metrics_listener_serves_get_metrics_and_nothing_else(
    kme_pki: TestPKI, tmp_path: Any
) -> None:
    log = tmp_path / "kme.log"
    proc, urls, reader = start_kme_process(
        kme_pki.directory, log, "--sae-a", "sae-hub", "--sae-b", "sae-edge-1",
        "--metrics-host", "127.0.0.1", "--metrics-port", "0",
    )  # fmt: skip
    try:
        metrics, admin = urls["metrics"], urls["admin"]
        assert metrics.startswith("http://127.0.0.1:")
        assert urlsplit(metrics).port != urlsplit(admin).port
        status, text = _http(metrics + "/metrics")
        assert status == 200
        assert "fleetbus_qkd_key_pool_keys" in text
        assert "fleetbus_qkd_link_up 1.0" in text
        for method, path in [
            ("GET", "/admin/state"),
            ("POST", "/admin/link"),
            ("POST", "/admin/reset"),
            ("POST", "/metrics"),
            ("GET", "/"),
            ("GET", "/metrics/x"),
        ]:
            body = b'{"up": false}' if method == "POST" else None
            status, _ = _http(metrics + path, method, body)
            assert status == 404, (method, path, status)
        # The switches were not reachable through it: the link is still up.
        status, state = _http(admin + "/admin/state")
        assert status == 200
        assert json.loads(state)["link_up"] is True
    finally:
        assert stop_kme_process(proc, reader) == 0


# -- durable pool: a real SIGKILL between enc_keys and dec_keys ------------------------------


def _pair_from(urls: dict[str, str], proc: Any, pki: TestPKI, log: Any) -> KMEPairUnderTest:
    return KMEPairUnderTest(
        kme_a_url=urls["kme_a"], kme_b_url=urls["kme_b"], admin_url=urls["admin"],
        pki=pki, process=proc, log_file=log,
    )  # fmt: skip


def test_keys_reserved_before_a_sigkill_are_fetched_once_after_the_restart(
    kme_pki: TestPKI, tmp_path: Any
) -> None:
    state_dir = tmp_path / "state"
    args = ("--sae-a", "sae-hub", "--sae-b", "sae-edge-1", "--state-dir", str(state_dir))
    proc, urls, reader = start_kme_process(kme_pki.directory, tmp_path / "1.log", *args)
    pair = _pair_from(urls, proc, kme_pki, tmp_path / "1.log")
    try:
        keys = enc(pair, number=2)
        fetched = [keys[0]["key_ID"]]
        status, data = pair.call(
            pair.kme_b_url, pair.slave_sae, "POST", dec_path(pair.master_sae),
            {"key_IDs": [{"key_ID": fetched[0]}]},
        )  # fmt: skip
        assert status == 200, data
    finally:
        proc.kill()  # SIGKILL: no chance to write anything on the way out
        proc.wait(timeout=15)
        reader.join(timeout=5)
    assert stat.S_IMODE((state_dir / "kme-pool.json").stat().st_mode) == 0o600
    proc, urls, reader = start_kme_process(kme_pki.directory, tmp_path / "2.log", *args)
    pair = _pair_from(urls, proc, kme_pki, tmp_path / "2.log")
    try:
        status, data = pair.call(
            pair.kme_b_url, pair.slave_sae, "POST", dec_path(pair.master_sae),
            {"key_IDs": [{"key_ID": keys[1]["key_ID"]}]},
        )  # fmt: skip
        assert status == 200, data
        assert data["keys"] == [keys[1]]  # the same bytes, after the restart
        for key_id in (keys[1]["key_ID"], fetched[0]):  # each side got each key once
            status, data = pair.call(
                pair.kme_b_url, pair.slave_sae, "GET",
                dec_path(pair.master_sae) + f"?key_ID={key_id}",
            )  # fmt: skip
            assert status == 400, data
    finally:
        assert stop_kme_process(proc, reader) == 0


def test_a_corrupt_state_file_stops_serve_with_a_clear_error(
    kme_pki: TestPKI, tmp_path: Any
) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "kme-pool.json").write_text('{"format": "fleetbus-kme-pool", "vers')
    result = subprocess.run(
        [sys.executable, "-m", "fleetbus.cli.kme", "serve", "--cert-dir",
         str(kme_pki.directory), "--port-a", "0", "--port-b", "0", "--admin-port", "0",
         "--sae-a", "sae-hub", "--sae-b", "sae-edge-1", "--state-dir", str(state_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "corrupt or truncated" in result.stderr
    assert str(state_dir / "kme-pool.json") in result.stderr
    assert "fleetbus-kme ready" not in result.stdout


# -- kme certs --san: a client verifies the KME under the extra name ---------------------------


def test_a_san_added_by_kme_certs_is_what_lets_a_client_verify_another_address(
    kme_pki: TestPKI, tmp_path: Any
) -> None:
    # 127.0.0.2 is loopback on Linux but not in the default SANs: a stand-in for `kme`.
    with_san = tmp_path / "pki"
    made = CliRunner().invoke(
        kme_app, ["certs", "--out", str(with_san), "--sae", "sae-hub", "--sae", "sae-edge-1",
                  "--san", "127.0.0.2"],
    )  # fmt: skip
    assert made.exit_code == 0, made.output
    path = status_path("sae-edge-1")
    for cert_dir, verifies in ((kme_pki.directory, False), (with_san, True)):
        proc, urls, reader = start_kme_process(
            cert_dir, tmp_path / "kme.log", "--host", "127.0.0.2",
            "--sae-a", "sae-hub", "--sae-b", "sae-edge-1",
        )  # fmt: skip
        try:
            assert urls["kme_a"].startswith("https://127.0.0.2:")
            ctx = ssl.create_default_context(cafile=str(cert_dir / "ca.pem"))
            ctx.load_cert_chain(str(cert_dir / "sae-hub.pem"), str(cert_dir / "sae-hub.key"))
            parts = urlsplit(urls["kme_a"])
            conn = http.client.HTTPSConnection("127.0.0.2", parts.port, context=ctx, timeout=10)
            try:
                if verifies:
                    conn.request("GET", path)
                    assert conn.getresponse().status == 200
                else:
                    with pytest.raises(ssl.SSLCertVerificationError, match=re.escape("127.0.0.2")):
                        conn.request("GET", path)
            finally:
                conn.close()
        finally:
            assert stop_kme_process(proc, reader) == 0
