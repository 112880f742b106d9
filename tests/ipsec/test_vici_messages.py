"""The VICI messages for one migration's SA (pure): selectors, proposals, PFS, the PSK's binding."""

from __future__ import annotations

import pytest

from sealift.ipsec.vici_client import TunnelEnd, connection_message, parse_list_sas, shared_key_message


def ends() -> tuple[TunnelEnd, TunnelEnd]:
    return (
        TunnelEnd("m1", "initiator", "10.0.0.1", "10.0.0.2", "m1.host-a", "m1.host-b", 7440),
        TunnelEnd("m1", "responder", "10.0.0.2", "10.0.0.1", "m1.host-b", "m1.host-a", 7440),
    )


def test_selectors_admit_only_the_migration_flow_both_ways() -> None:
    source, destination = ends()
    src_child = connection_message(source)["m1"]["children"]["m1"]
    dst_child = connection_message(destination)["m1"]["children"]["m1"]
    assert src_child["local_ts"] == ["10.0.0.1/32[tcp]"] and src_child["remote_ts"] == ["10.0.0.2/32[tcp/7440]"]
    # The destination's view is the same flow, mirrored.
    assert dst_child["local_ts"] == src_child["remote_ts"] and dst_child["remote_ts"] == src_child["local_ts"]


def test_ikev2_psk_aes_gcm_and_a_key_exchange_for_the_child() -> None:
    source, destination = ends()
    conn = connection_message(source)["m1"]
    assert conn["version"] == "2" and conn["local_addrs"] == ["10.0.0.1"] and conn["remote_addrs"] == ["10.0.0.2"]
    assert conn["local-psk"] == {"auth": "psk", "id": "m1.host-a"}
    assert conn["remote-psk"] == {"auth": "psk", "id": "m1.host-b"}
    assert conn["proposals"] == ["aes256gcm16-prfsha256-x25519"]
    assert conn["children"]["m1"]["esp_proposals"] == ["aes256gcm16-x25519"]
    # Childless IKE SA: the child SA comes from CREATE_CHILD_SA with its own X25519 exchange.
    assert conn["childless"] == "force" and connection_message(destination)["m1"]["childless"] == "allow"
    assert conn["unique"] == "never"  # concurrent migrations between one pair must not replace each other


def test_the_psk_message_binds_the_key_to_both_identities() -> None:
    message = shared_key_message("sealift-m1-e3", b"k" * 32, ["m1.host-a", "m1.host-b"])
    assert message == {"id": "sealift-m1-e3", "type": "IKE", "data": b"k" * 32, "owners": ["m1.host-a", "m1.host-b"]}
    with pytest.raises(ValueError, match="16 bytes"):
        shared_key_message("k", b"short", ["a"])
    with pytest.raises(ValueError, match="key id"):
        shared_key_message("bad id!", b"k" * 32, ["a"])


def test_bad_tunnel_ends_are_refused() -> None:
    with pytest.raises(ValueError, match="tunnel name"):
        TunnelEnd("m 1", "initiator", "10.0.0.1", "10.0.0.2", "a", "b", 7440)
    with pytest.raises(ValueError, match="role"):
        TunnelEnd("m1", "client", "10.0.0.1", "10.0.0.2", "a", "b", 7440)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="port"):
        TunnelEnd("m1", "initiator", "10.0.0.1", "10.0.0.2", "a", "b", 0)


def test_list_sas_events_become_records() -> None:
    event = {
        "m1": {
            "state": b"ESTABLISHED",
            "local-host": b"10.0.0.1",
            "remote-host": b"10.0.0.2",
            "child-sas": {
                "m1-3": {
                    "name": b"m1",
                    "state": b"INSTALLED",
                    "mode": b"TUNNEL",
                    "protocol": b"ESP",
                    "spi-in": b"c1a2b3c4",
                    "spi-out": b"d1e2f3a4",
                    "encr-alg": b"AES_GCM_16",
                    "encr-keysize": b"256",
                    "dh-group": b"CURVE_25519",
                    "encap": b"yes",
                    "bytes-in": b"10",
                    "bytes-out": b"20",
                }
            },
        }
    }
    (ike,) = parse_list_sas([event])
    assert ike.state == "ESTABLISHED" and ike.remote_host == "10.0.0.2"
    (child,) = ike.children
    assert (child.encryption, child.dh_group, child.udp_encapsulated) == ("AES_GCM_16-256", "CURVE_25519", True)
    assert (child.spi_in, child.spi_out, child.bytes_out) == ("c1a2b3c4", "d1e2f3a4", 20)
    assert parse_list_sas([{"m2": {"state": b"CONNECTING"}}])[0].children == ()
