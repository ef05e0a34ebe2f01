"""Destination parsing: every accepted form and every error (skypty/dest.py)."""
from __future__ import annotations

import pytest

from conftest import load_vector
from skypty.dest import Dest, parse_dest, parse_via
from skypty.errors import DestinationError, UsageError
from skypty.keys import PubKey

KEYS = load_vector("keys.json")
PK = KEYS["cases"][0]["pk"]
PK2 = KEYS["cases"][1]["pk"]
INVALID = {c["name"]: c["pk_hex"] for c in KEYS["invalid_public_keys"]}


def test_pk_at_host_port():
    d = parse_dest(f"{PK}@example.org:2200")
    assert (d.pk, d.host, d.port, d.scheme) == (PubKey.from_hex(PK), "example.org", 2200, "tcp")
    assert d.is_tcp
    assert str(d) == f"tcp://{PK}@example.org:2200"


def test_port_spliced_from_default():
    assert parse_dest(f"{PK}@10.0.0.7").port == 2022
    assert parse_dest(f"{PK}@10.0.0.7", default_port=2300).port == 2300
    assert parse_dest(f"{PK}@10.0.0.7:9", default_port=2300).port == 9


def test_tcp_prefix_and_case():
    d = parse_dest(f"TCP://{PK.upper()}@LocalHost:1")
    assert d.pk.hex() == PK and d.host == "LocalHost" and d.port == 1 and d.scheme == "tcp"
    assert parse_dest(f"tcp://{PK}@h") == parse_dest(f"{PK}@h:2022")


def test_ipv6_bracketed():
    d = parse_dest(f"{PK}@[::1]:2022")
    assert (d.host, d.port) == ("::1", 2022)
    assert d.hostport() == "[::1]:2022"
    assert str(d) == f"tcp://{PK}@[::1]:2022"
    assert parse_dest(f"{PK}@[fe80::1%eth0]:7").host == "fe80::1%eth0"
    assert parse_dest(f"{PK}@[2001:db8::5]", default_port=99).port == 99


def test_bare_pk_and_schemes():
    d = parse_dest(PK, default_port=22)
    assert (d.pk.hex(), d.host, d.port, d.scheme) == (PK, None, 22, "")
    assert not d.is_tcp
    assert parse_dest(f"{PK}:23", default_port=22).port == 23
    d = parse_dest(f"dmsg://{PK.upper()}", default_port=22)
    assert (d.pk.hex(), d.port, d.scheme) == (PK, 22, "dmsg")
    assert parse_dest(f"dmsg://{PK}:44").port == 44
    d = parse_dest(f"skynet://{PK}", default_port=22)
    assert (d.scheme, d.port) == ("skynet", 22)
    assert str(d) == f"skynet://{PK}:22"


def test_via():
    d = parse_via(f"tcp://{PK2}@127.0.0.1:2022")
    assert (d.pk.hex(), d.host, d.port, d.scheme) == (PK2, "127.0.0.1", 2022, "tcp")
    with pytest.raises(DestinationError, match="--via wants tcp://"):
        parse_via(f"{PK2}@127.0.0.1:2022")
    with pytest.raises(DestinationError, match="missing port"):
        parse_via(f"tcp://{PK2}@127.0.0.1")
    assert parse_via(f"tcp://{PK2}@127.0.0.1", default_port=2022).port == 2022


def test_require_port():
    with pytest.raises(DestinationError, match="missing port"):
        parse_dest(f"tcp://{PK}@h", require_port=True)


BAD = [
    ("", "empty destination"),
    ("   ", "empty destination"),
    (f"{PK}@", "empty host"),
    (f"{PK}@:2022", "empty host"),
    (f"{PK}@[]:2022", "empty host"),
    (f"@host:2022", "missing public key"),
    (f"{PK[:-2]}zz@h", "not hexadecimal"),
    (f"{PK[:-2]}@h", "64 hex characters, want 66"),
    (f"{PK}00@h", "68 hex characters, want 66"),
    (f"{INVALID['not_on_curve']}@h", "not a point on secp256k1"),
    (f"{INVALID['wrong_length_65_uncompressed']}@h", "130 hex characters"),
    ("0" * 66 + "@h", "null key"),
    (f"{PK}@h:", "empty port"),
    (f"{PK}@h:ssh", "not a number"),
    (f"{PK}@h:-1", "not a number"),
    (f"{PK}@h:0", "out of range"),
    (f"{PK}@h:65536", "out of range"),
    (f"{PK}@h:99999999999", "out of range"),
    (f"{PK}@::1", "must be bracketed"),
    (f"{PK}@::1:2022", "must be bracketed"),
    (f"{PK}@fe80::1", "must be bracketed"),
    (f"{PK}@[::1", "unterminated"),
    (f"{PK}@[::1]2022", "unexpected"),
    (f"{PK}@[nothex]:2022", "invalid IPv6 address"),
    (f"{PK}@[::1]:abc", "not a number"),
    (f"{PK}@h/x:22", "invalid host"),
    (f"{PK}@-h:22", "invalid host"),
    (f"{PK}@a@b:22", "more than one '@'"),
    (f"{PK}@h 1:22", "whitespace"),
    (f"ssh://{PK}@h:22", "unknown scheme"),
    (f"dmsg://{PK}@h:22", "takes a bare <pk>"),
    (f"skynet://{PK}@h", "takes a bare <pk>"),
    (f"tcp://{PK}", "tcp:// needs <pk>@host:port"),
    (f"{PK}:0", "out of range"),
    (f"dmsg://{PK}:x", "not a number"),
    ("dmsg://", "missing public key"),
    ("hello", "not hexadecimal"),
]


@pytest.mark.parametrize("text,why", BAD, ids=[b[1] + ":" + b[0][-12:] for b in BAD])
def test_errors(text, why):
    with pytest.raises(DestinationError) as ei:
        parse_dest(text)
    msg = str(ei.value)
    assert why in msg
    assert "\n" not in msg
    # exit code 2: a destination error is a usage error
    assert isinstance(ei.value, UsageError) and ei.value.exit_code == 2


def test_dest_value_semantics():
    a = parse_dest(f"{PK}@h:1")
    b = Dest(PubKey.from_hex(PK), "h", 1, "tcp")
    assert a == b and hash(a) == hash(b)
    assert a != parse_dest(f"{PK}@h:2")
