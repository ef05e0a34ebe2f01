"""skypty.keys against the Go known-answer vectors (keys.json, ecdh.json, sig.json)."""
from __future__ import annotations

import hashlib
import pickle

import pytest

from conftest import load_vector, sign_hash_fixed_nonce
from skypty import keys
from skypty.errors import KeyFormatError, ProtocolError, UsageError
from skypty.keys import PubKey, SecKey, SignatureError

KEYS = load_vector("keys.json")
ECDH = load_vector("ecdh.json")
SIG = load_vector("sig.json")


@pytest.mark.parametrize("case", KEYS["cases"] + KEYS["edge_secret_keys"], ids=lambda c: c["name"])
def test_pk_from_sk(case):
    if "seed" in case:
        assert hashlib.sha256(case["seed"].encode()).hexdigest() == case["sk"]
    sk = SecKey.from_hex(case["sk"])
    assert sk.hex() == case["sk"]
    assert bytes(sk) == bytes.fromhex(case["sk"])
    assert sk.pubkey().hex() == case["pk"]
    assert PubKey.from_hex(case["pk"].upper()) == sk.pubkey()
    assert SecKey(bytes.fromhex(case["sk"].upper())) == sk


def test_uncompressed_reference_is_rejected():
    for case in KEYS["cases"]:
        with pytest.raises(KeyFormatError):
            PubKey.from_hex(case["pk_uncompressed_65"])


@pytest.mark.parametrize("case", KEYS["invalid_secret_keys"], ids=lambda c: c["name"])
def test_invalid_secret_keys(case):
    with pytest.raises(KeyFormatError) as ei:
        SecKey.from_hex(case["sk_hex"])
    msg = str(ei.value)
    assert "\n" not in msg and "secret key" in msg
    assert case["sk_hex"] not in msg  # never echo a secret
    with pytest.raises(KeyFormatError):
        SecKey(bytes.fromhex(case["sk_hex"]))


@pytest.mark.parametrize("case", KEYS["invalid_public_keys"], ids=lambda c: c["name"])
def test_invalid_public_keys(case):
    text_ok = case["PubKey.UnmarshalText (JSON path)"]["ok"]
    if text_ok:  # only the null key: text accepts it, the binary constructors refuse a real use
        pk = PubKey.from_hex(case["pk_hex"])
        assert pk.is_null() and pk == PubKey.null()
        with pytest.raises(KeyFormatError):
            keys.ecdh(SecKey.from_hex(KEYS["cases"][0]["sk"]), pk)
        return
    with pytest.raises(KeyFormatError) as ei:
        PubKey.from_hex(case["pk_hex"])
    assert "\n" not in str(ei.value) and "public key" in str(ei.value)
    with pytest.raises(KeyFormatError):
        PubKey(bytes.fromhex(case["pk_hex"]))


@pytest.mark.parametrize("case", KEYS["pubkey_unmarshal_text_cases"], ids=lambda c: repr(c["text"]))
def test_pubkey_text_cases(case):
    if case["result"]["ok"]:
        assert PubKey.from_hex(case["text"]).hex() == case["resulting_pk_hex"]
    else:
        with pytest.raises(KeyFormatError):
            PubKey.from_hex(case["text"])


@pytest.mark.parametrize("text", ["0" * 200, "00", "0" * 66])
def test_all_zero_strings_are_null(text):
    assert PubKey.from_hex(text).is_null()


@pytest.mark.parametrize("text", [" " + "0" * 66, "0x" + KEYS["cases"][0]["pk"], KEYS["cases"][0]["pk"] + "\n",
                                  KEYS["cases"][0]["pk"][:-1], KEYS["cases"][0]["pk"] + "00",
                                  "02 adc99e06a1bd315fe6e368a9c17e58356263378cd60029a49a1028faa67f3a88"])
def test_pubkey_text_garbage(text):
    with pytest.raises(KeyFormatError):
        PubKey.from_hex(text)


def test_key_format_error_is_usage_error():
    assert issubclass(KeyFormatError, UsageError)
    assert issubclass(SignatureError, ProtocolError)


def test_pubkey_value_semantics():
    pk = PubKey.from_hex(KEYS["cases"][1]["pk"])
    same = PubKey(bytes(pk))
    assert pk == same and hash(pk) == hash(same) and len({pk, same}) == 1
    assert pk != PubKey.from_hex(KEYS["cases"][2]["pk"])
    assert str(pk) == pk.hex() and pk.hex() in repr(pk)
    assert pickle.loads(pickle.dumps(pk)) == pk
    with pytest.raises(AttributeError):
        pk._b = b"x"  # type: ignore[misc]
    assert not pk.is_null() and PubKey.null().is_null()
    assert bytes(PubKey.null()) == bytes(33)


def test_seckey_repr_hides_secret():
    sk = SecKey.from_hex(KEYS["cases"][0]["sk"])
    assert KEYS["cases"][0]["sk"] not in repr(sk) and KEYS["cases"][0]["sk"] not in str(sk)


def test_generate_keypair():
    seen = set()
    for _ in range(5):
        pk, sk = keys.generate_keypair()
        assert sk.pubkey() == pk and len(bytes(pk)) == 33 and bytes(pk)[0] in (2, 3)
        seen.add(pk)
    assert len(seen) == 5


@pytest.mark.parametrize("case", ECDH["cases"], ids=lambda c: f'{c["a"]}-{c["b"]}')
def test_ecdh(case):
    ska, skb = SecKey.from_hex(case["sk_a"]), SecKey.from_hex(case["sk_b"])
    pka, pkb = PubKey.from_hex(case["pk_a"]), PubKey.from_hex(case["pk_b"])
    assert hashlib.sha256(bytes.fromhex(case["shared_point_compressed_33"])).hexdigest() == case["cipher_ecdh_32"]
    assert keys.ecdh(ska, pkb).hex() == case["cipher_ecdh_32"]
    assert keys.ecdh(skb, pka).hex() == case["cipher_ecdh_32"]
    assert keys.noise_dh(ska, pkb).hex() == case["noise_dh_33"]
    assert len(keys.noise_dh(skb, pka)) == ECDH["dh_len"] == 33


@pytest.mark.parametrize("bad", [b"\x02" + bytes(32), bytes(33), bytes(32)])
def test_ecdh_invalid_peer_key(bad):
    sk = SecKey.from_hex(KEYS["cases"][0]["sk"])
    with pytest.raises(KeyFormatError):
        keys.noise_dh(sk, bad)


def _sig_cases():
    return SIG["cases"]


@pytest.mark.parametrize("case", _sig_cases(), ids=lambda c: c["name"])
def test_signatures(case):
    sk, pk = SecKey.from_hex(case["sk"]), PubKey.from_hex(case["pk"])
    msg = bytes.fromhex(case["message_hex"])
    digest = hashlib.sha256(msg).digest()
    assert digest.hex() == case["signed_hash_sha256"]
    fixed = bytes.fromhex(case["fixed_nonce_sig"])
    assert fixed[:32].hex() == case["fixed_nonce_sig_r"] and fixed[32:64].hex() == case["fixed_nonce_sig_s"]
    assert fixed[64] == case["fixed_nonce_sig_recid"]

    # The fixed-nonce signatures are reproduced bit for bit (same primitive, same k).
    got = sign_hash_fixed_nonce(sk, digest, bytes.fromhex(case["fixed_nonce_k"]))
    assert got.hex() == case["fixed_nonce_sig"]

    keys.verify(pk, msg, fixed)
    assert keys.recover(digest, fixed) == pk
    for rs in case["random_sigs_from_cipher.SignPayload"]:
        assert rs["verify"]["ok"]
        keys.verify(pk, msg, bytes.fromhex(rs["sig"]))
        assert keys.recover(digest, bytes.fromhex(rs["sig"])) == pk

    # Our own production signatures: low-S, verify, recover.
    ours = keys.sign(sk, msg)
    assert len(ours) == 65 and ours[64] < 2
    assert int.from_bytes(ours[32:64], "big") <= N // 2
    keys.verify(pk, msg, ours)
    assert keys.recover(digest, ours) == pk
    assert keys.sign_hash(sk, digest)[:64] == ours[:64]  # same digest, RFC 6979 nonce

    # Every negative case Go rejects, we reject.
    assert not case["verify_tampered_message (message||'!')"]["ok"]
    with pytest.raises(SignatureError):
        keys.verify(pk, msg + b"!", fixed)
    assert not case["verify_wrong_public_key"]["ok"]
    other = PubKey.from_hex(KEYS["cases"][7]["pk"] if case["pk"] != KEYS["cases"][7]["pk"] else KEYS["cases"][6]["pk"])
    with pytest.raises(SignatureError):
        keys.verify(other, msg, fixed)
    for name in ("verify_sig_with_bit_flipped_in_S (byte 40 ^= 1)", "verify_high_S_variant (S'=n-S, recid^1)",
                 "verify_recid_flipped", "verify_recid_4"):
        neg = case[name]
        assert not neg["result"]["ok"]
        with pytest.raises(SignatureError) as ei:
            keys.verify(pk, msg, bytes.fromhex(neg["sig"]))
        assert "\n" not in str(ei.value)
    high = bytes.fromhex(case["verify_high_S_variant (S'=n-S, recid^1)"]["sig"])
    assert str(_raises(keys.verify, pk, msg, high)) == case["verify_high_S_variant (S'=n-S, recid^1)"]["result"]["error"]


N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _raises(fn, *a):
    with pytest.raises(SignatureError) as ei:
        fn(*a)
    return ei.value


def test_signature_shape_checks():
    case = SIG["cases"][1]
    pk = PubKey.from_hex(case["pk"])
    msg = bytes.fromhex(case["message_hex"])
    fixed = bytes.fromhex(case["fixed_nonce_sig"])
    for bad in (fixed[:64], fixed + b"\x00", b"", bytes(65), fixed[:64] + b"\x02", fixed[:64] + b"\x03"):
        with pytest.raises(SignatureError):
            keys.verify(pk, msg, bad)
    with pytest.raises(SignatureError):
        keys.verify(PubKey.null(), msg, fixed)
    with pytest.raises(SignatureError):
        keys.recover(b"\x01" * 32, bytes(65))
    with pytest.raises(ValueError):
        keys.sign_hash(SecKey.from_hex(case["sk"]), b"short")


@pytest.mark.parametrize("wrap", [lambda h: "0x" + h, lambda h: h + "\n", lambda h: "02" + h, lambda h: h[:-1]])
def test_key_errors_never_echo_the_text(wrap):
    """A secret pasted where a public key belongs must not land in an error message (or a log)."""
    sk_hex = KEYS["cases"][0]["sk"]
    for parse, text in ((PubKey.from_hex, sk_hex), (PubKey.from_hex, wrap(sk_hex)), (SecKey.from_hex, wrap(sk_hex))):
        with pytest.raises(KeyFormatError) as ei:
            parse(text)
        assert sk_hex[:16] not in str(ei.value)
    with pytest.raises(KeyFormatError) as ei:
        PubKey(bytes.fromhex("04" + sk_hex))
    assert sk_hex[:16] not in str(ei.value)


def test_pubkey_ordering_with_other_types():
    pk = PubKey.from_hex(KEYS["cases"][0]["pk"])
    assert sorted([pk, PubKey.null()])[0].is_null()
    with pytest.raises(TypeError):
        pk < "02"
