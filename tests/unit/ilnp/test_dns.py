"""ipshift.ilnp.dns without a server: record values, the update message, the interpretation of
answers built with dnspython, TSIG key files, and the I/O layer against loopback sockets."""

from __future__ import annotations

import shutil
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.tsig
import dns.update
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.ilnp.dns import (
    DEFAULT_TTL,
    DnsLookupError,
    DnsUpdateError,
    IlnpRecords,
    LookupFailure,
    RecordError,
    TsigKey,
    TsigKeyFileError,
    format_id64,
    format_tsig_key,
    generate_tsig_key,
    l64_of,
    l64_prefix,
    lookup,
    parse_id64,
    parse_tsig_key,
    publish,
    read_tsig_key,
    resolve,
    send_update,
    update_answer,
    update_message,
    write_tsig_key,
)

ZONE = "ilnp.test."
KEY = TsigKey("ilnp-update", "hmac-sha256", bytes(range(32)))
MN = IlnpRecords("mn.ilnp.test.", nids=((10, 0x0000_0000_0000_0010),),
                 l64s=((10, 0x2001_0db8_0001_0000), (20, 0x2001_0db8_0002_0000)))

NID = dns.rdatatype.RdataType.NID
L64 = dns.rdatatype.RdataType.L64

# --- strategies -------------------------------------------------------------------------------
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,14}[a-z0-9])?", fullmatch=True)
hostnames = st.lists(labels, min_size=1, max_size=3).map(lambda ls: ".".join(ls) + "." + ZONE)
pairs = st.lists(st.tuples(st.integers(0, 2**16 - 1), st.integers(0, 2**64 - 1)),
                 min_size=1, max_size=6)
ttls = st.integers(0, 2**31 - 1)
records = st.builds(IlnpRecords, hostnames, pairs, pairs, ttls)


# --- values -----------------------------------------------------------------------------------
def test_id64_presentation_is_four_groups_of_four_hex_digits() -> None:
    assert format_id64(0x00144FFFFF20EE64) == "0014:4fff:ff20:ee64"
    assert format_id64(0) == "0000:0000:0000:0000"
    assert parse_id64("0014:4FFF:ff20:EE64") == 0x00144FFFFF20EE64


@pytest.mark.parametrize("text", ["14:4fff:ff20:ee64", "0014:4fff:ff20", "0014-4fff-ff20-ee64",
                                  "0014:4fff:ff20:ee6g", "0014:4fff:ff20:ee64:0000", "",
                                  "+014:4fff:ff20:ee64"])
def test_id64_malformed_text_is_refused(text: str) -> None:
    with pytest.raises(RecordError, match="four groups of four hex digits"):
        parse_id64(text)


@given(st.integers(0, 2**64 - 1))
def test_id64_round_trip(value: int) -> None:
    text = format_id64(value)
    assert parse_id64(text) == value
    # the same text as dnspython's own NID presentation
    rdata = dns.rdata.from_text(dns.rdataclass.IN, NID, f"1 {text}")
    assert rdata.to_text() == f"1 {text}"


def test_l64_and_ipv6_prefix() -> None:
    assert l64_of("2001:db8:1::/64") == 0x2001_0DB8_0001_0000
    assert str(l64_prefix(0x2001_0DB8_0001_0000)) == "2001:db8:1::/64"
    with pytest.raises(RecordError, match="/64"):
        l64_of("2001:db8::/48")
    with pytest.raises(RecordError, match="not an IPv6 prefix"):
        l64_of("192.0.2.0/24")


def test_records_are_normalised_rrsets() -> None:
    rec = IlnpRecords("MN.Ilnp.Test", nids=[(20, 2), (10, 1), (20, 2)], l64s=[(5, 9), (5, 3)])
    assert rec.hostname == "mn.ilnp.test."
    assert rec.nids == ((10, 1), (20, 2))  # sorted, the repeat counted once
    assert rec.l64s == ((5, 3), (5, 9))
    assert rec.ttl == DEFAULT_TTL == 30
    assert rec.preferred_nid == 1
    assert rec.preferred_l64s == (3, 9)  # equal preference: both equally good
    assert "0000:0000:0000:0001" in str(rec)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"nids": ()}, "at least one NID"),
    ({"l64s": []}, "at least one L64"),
    ({"nids": ((70000, 1),)}, "preference is 0..65535"),
    ({"nids": ((-1, 1),)}, "preference"),
    ({"l64s": ((1, 2**64),)}, "64-bit"),
    ({"l64s": ((1, -1),)}, "64-bit"),
    ({"l64s": ((True, 1),)}, "preference"),
    ({"nids": ((1, "0000:0000:0000:0001"),)}, "64-bit"),
    ({"nids": (1, 2)}, "pairs"),
    ({"ttl": -1}, "TTL"),
    ({"ttl": 2**31}, "TTL"),
    ({"hostname": "a..b"}, "not a DNS name"),
    ({"hostname": "x" * 64 + ".test"}, "not a DNS name"),
])
def test_bad_record_values_are_refused(kwargs: dict[str, object], match: str) -> None:
    values: dict[str, object] = {"hostname": "mn.ilnp.test.", "nids": ((1, 1),),
                                 "l64s": ((1, 1),)}
    values.update(kwargs)
    with pytest.raises(RecordError, match=match):
        IlnpRecords(**values)  # type: ignore[arg-type]


# --- the update -------------------------------------------------------------------------------
def _pair(rdata: dns.rdata.Rdata) -> tuple[int, int]:
    wire = rdata.to_digestable()
    return int.from_bytes(wire[:2], "big"), int.from_bytes(wire[2:], "big")


def _adds(message: dns.message.Message) -> dict[int, list[tuple[int, int, int]]]:
    """(ttl, preference, value) of every RR added, by type."""
    found: dict[int, list[tuple[int, int, int]]] = {}
    for rrset in message.update:  # type: ignore[attr-defined]
        if rrset.deleting is None:
            for rd in rrset:
                found.setdefault(rrset.rdtype, []).append((rrset.ttl, *_pair(rd)))
    return found


def test_update_message_replaces_both_rrsets_signed() -> None:
    message = update_message(ZONE, MN, KEY)
    assert message.zone[0].name == dns.name.from_text(ZONE)
    assert message.zone[0].rdtype == dns.rdatatype.SOA
    assert not message.prerequisite
    owner = dns.name.from_text("mn.ilnp.test.")
    rows = [(r.name, r.rdtype, r.deleting, r.ttl, [_pair(rd) for rd in r])
            for r in message.update]
    # first both RRsets deleted (class ANY, no rdata), then the new records added: in one
    # message, so the server applies it atomically
    assert rows == [
        (owner, NID, dns.rdataclass.ANY, 0, []),
        (owner, L64, dns.rdataclass.ANY, 0, []),
        (owner, NID, None, 30, [(10, 0x10)]),
        (owner, L64, None, 30, [(10, 0x20010DB800010000)]),
        (owner, L64, None, 30, [(20, 0x20010DB800020000)]),
    ]
    assert _adds(message) == {NID: [(30, 10, 0x10)],
                              L64: [(30, 10, 0x20010DB800010000), (30, 20, 0x20010DB800020000)]}
    assert message.keyname == dns.name.from_text("ilnp-update.")
    assert message.keyalgorithm == dns.tsig.HMAC_SHA256
    wire = message.to_wire()
    # the server's view: the TSIG is there and verifies with the key
    received = dns.message.from_wire(wire, keyring={KEY.dns_key().name: KEY.dns_key()})
    assert received.had_tsig
    assert isinstance(received, dns.update.UpdateMessage)
    assert _adds(received) == _adds(message)
    with pytest.raises(dns.tsig.BadSignature):
        dns.message.from_wire(wire, keyring=TsigKey("ilnp-update", "hmac-sha256",
                                                    b"\xff" * 32).dns_key())


def test_update_for_a_name_outside_the_zone_is_refused_before_sending() -> None:
    other = IlnpRecords("mn.other.test.", MN.nids, MN.l64s)
    with pytest.raises(RecordError, match=r"not in zone ilnp\.test\."):
        update_message(ZONE, other, KEY)


@settings(max_examples=60)
@given(records)
def test_record_values_round_trip_through_the_update(rec: IlnpRecords) -> None:
    wire = update_message(ZONE, rec, KEY).to_wire()
    received = dns.message.from_wire(wire, keyring=KEY.dns_key())
    adds = _adds(received)
    back = IlnpRecords(rec.hostname, [(p, v) for _, p, v in adds[NID]],
                       [(p, v) for _, p, v in adds[L64]],
                       {t for rows in adds.values() for t, _, _ in rows}.pop())
    assert back == rec


# --- answers to the update --------------------------------------------------------------------
def _server_side(update: dns.message.Message, key: TsigKey = KEY) -> dns.message.Message:
    return dns.message.from_wire(update.to_wire(), keyring=key.dns_key())


def test_an_applied_update_is_accepted() -> None:
    update = update_message(ZONE, MN, KEY)
    response = dns.message.make_response(_server_side(update))
    assert update_answer(update, response.to_wire()).rcode() == dns.rcode.NOERROR


@pytest.mark.parametrize("rcode", ["REFUSED", "NOTAUTH", "NOTZONE", "SERVFAIL", "FORMERR"])
def test_an_error_rcode_names_itself(rcode: str) -> None:
    update = update_message(ZONE, MN, KEY)
    response = dns.message.make_response(_server_side(update))
    response.set_rcode(dns.rcode.from_text(rcode))
    with pytest.raises(DnsUpdateError, match=f"refused: {rcode} ") as info:
        update_answer(update, response.to_wire())
    assert info.value.rcode == rcode and info.value.tsig_error is None


@pytest.mark.parametrize("tsig_error", ["BADSIG", "BADKEY", "BADTIME"])
def test_a_tsig_error_names_rcode_and_tsig_error(tsig_error: str) -> None:
    update = update_message(ZONE, MN, KEY)
    response = dns.message.make_response(_server_side(update),
                                         tsig_error=dns.rcode.from_text(tsig_error))
    response.set_rcode(dns.rcode.NOTAUTH)
    with pytest.raises(DnsUpdateError, match=f"NOTAUTH, TSIG error {tsig_error}") as info:
        update_answer(update, response.to_wire())
    assert (info.value.rcode, info.value.tsig_error) == ("NOTAUTH", tsig_error)


def test_an_unsigned_refusal_keeps_its_rcode_and_unsigned_success_is_refused() -> None:
    update = update_message(ZONE, MN, KEY)
    update.to_wire()
    unsigned = dns.message.make_response(dns.message.from_wire(update.to_wire(),
                                                               keyring=False))
    unsigned.set_rcode(dns.rcode.NOTAUTH)
    with pytest.raises(DnsUpdateError, match=r"refused: NOTAUTH \(an unsigned answer") as info:
        update_answer(update, unsigned.to_wire())
    assert info.value.rcode == "NOTAUTH"
    unsigned.set_rcode(dns.rcode.NOERROR)
    with pytest.raises(DnsUpdateError, match="requires a TSIG") as info:
        update_answer(update, unsigned.to_wire())
    assert info.value.rcode is None


def test_an_answer_signed_with_another_key_is_refused() -> None:
    update = update_message(ZONE, MN, KEY)
    other = TsigKey("ilnp-update", "hmac-sha256", b"\x01" * 32)
    server_view = dns.message.from_wire(update.to_wire(), keyring=False)
    response = dns.message.make_response(server_view)
    response.use_tsig(other.dns_key())
    response.request_mac = update.mac
    with pytest.raises(DnsUpdateError, match="does not verify"):
        update_answer(update, response.to_wire())


def test_an_answer_to_another_message_is_refused() -> None:
    update = update_message(ZONE, MN, KEY)
    response = dns.message.make_response(_server_side(update))
    response.id = (update.id + 1) % 65536
    with pytest.raises(DnsUpdateError):
        update_answer(update, response.to_wire())


def test_an_unsigned_update_cannot_be_checked() -> None:
    update = dns.update.UpdateMessage(ZONE)
    with pytest.raises(DnsUpdateError, match="not TSIG-signed"):
        update_answer(update, b"")


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_any_bytes_as_an_answer_give_one_typed_error(wire: bytes) -> None:
    update = update_message(ZONE, MN, KEY)
    update.to_wire()
    with pytest.raises(DnsUpdateError):
        update_answer(update, wire)



@settings(max_examples=300)
@given(st.data())
def test_a_damaged_answer_gives_one_typed_error(data: st.DataObject) -> None:
    """Any byte of a signed answer changed: refused with DnsUpdateError (the MAC covers the
    message), or, where the change means nothing (the case of the key's name, which TSIG
    signs in canonical form), still the same accepted answer; never another exception."""
    update = update_message(ZONE, MN, KEY)
    wire = bytearray(dns.message.make_response(_server_side(update)).to_wire())
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] ^= data.draw(st.integers(1, 255))
    try:
        response = update_answer(update, bytes(wire))
    except DnsUpdateError:
        return
    assert response.rcode() == dns.rcode.NOERROR and response.id == update.id

# --- lookups ----------------------------------------------------------------------------------
def _rrset(rec: IlnpRecords, rdtype: int) -> dns.rrset.RRset:
    values = rec.nids if rdtype == NID else rec.l64s
    return dns.rrset.from_text_list(rec.hostname, rec.ttl, "IN", rdtype,
                                    [f"{p} {format_id64(v)}" for p, v in values])


def _answer(query: dns.message.QueryMessage, rec: IlnpRecords | None = None,
            rcode: int = dns.rcode.NOERROR,
            rrsets: tuple[dns.rrset.RRset, ...] = ()) -> dns.message.Message:
    """The answer a server would send (through the wire, as a resolver receives it)."""
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    response.answer.extend(rrsets)
    if rec is not None:
        response.answer.append(_rrset(rec, query.question[0].rdtype))
    return dns.message.from_wire(response.to_wire())


def test_lookup_queries_and_parse() -> None:
    queries = lookup("MN.ilnp.test").queries()
    assert [(q.question[0].name.to_text(), q.question[0].rdtype) for q in queries] == [
        ("mn.ilnp.test.", NID), ("mn.ilnp.test.", L64)]
    assert all(not q.flags & dns.flags.RD for q in queries)
    answers = [_answer(q, MN) for q in queries]
    assert lookup("mn.ilnp.test.").parse(answers) == MN
    assert lookup("mn.ilnp.test.").parse(reversed(answers)) == MN


@settings(max_examples=60)
@given(records)
def test_record_values_round_trip_through_answers(rec: IlnpRecords) -> None:
    query = lookup(rec.hostname)
    assert query.parse(_answer(q, rec) for q in query.queries()) == rec


def test_the_smallest_ttl_is_kept_and_cnames_followed() -> None:
    nid_q, l64_q = lookup("alias.ilnp.test.").queries()
    cname = dns.rrset.from_text("alias.ilnp.test.", 10, "IN", "CNAME", "mn.ilnp.test.")
    responses = [_answer(q, rrsets=(cname, _rrset(MN, q.question[0].rdtype)))
                 for q in (nid_q, l64_q)]
    found = lookup("alias.ilnp.test.").parse(responses)
    assert (found.hostname, found.nids, found.l64s, found.ttl) == (
        "alias.ilnp.test.", MN.nids, MN.l64s, 10)


@pytest.mark.parametrize(("rcode", "reason"), [
    (dns.rcode.NXDOMAIN, LookupFailure.NXDOMAIN),
    (dns.rcode.REFUSED, LookupFailure.FAILED),
    (dns.rcode.SERVFAIL, LookupFailure.FAILED),
])
def test_an_error_answer_is_one_lookup_error(rcode: int, reason: LookupFailure) -> None:
    queries = lookup("mn.ilnp.test.").queries()
    with pytest.raises(DnsLookupError) as info:
        lookup("mn.ilnp.test.").parse([_answer(queries[0], rcode=rcode), _answer(queries[1])])
    assert info.value.reason is reason and info.value.name == "mn.ilnp.test."


def test_a_name_without_l64_is_nodata() -> None:
    nid_q, l64_q = lookup("mn.ilnp.test.").queries()
    with pytest.raises(DnsLookupError, match="no L64 records") as info:
        lookup("mn.ilnp.test.").parse([_answer(nid_q, MN), _answer(l64_q)])
    assert info.value.reason is LookupFailure.NODATA


def test_answers_to_other_questions_are_refused() -> None:
    other = lookup("cn.ilnp.test.").queries()
    mine = lookup("mn.ilnp.test.").queries()
    with pytest.raises(DnsLookupError, match="no answer to the NID or L64 query") as info:
        lookup("mn.ilnp.test.").parse([_answer(q, MN) for q in other])
    assert info.value.reason is LookupFailure.FAILED
    with pytest.raises(DnsLookupError, match="no answer to the L64 query"):
        lookup("mn.ilnp.test.").parse([_answer(mine[0], MN)])
    aaaa = dns.message.make_query("mn.ilnp.test.", "AAAA")
    with pytest.raises(DnsLookupError, match="AAAA is no answer"):
        lookup("mn.ilnp.test.").parse([_answer(aaaa)])


# --- TSIG key files ---------------------------------------------------------------------------
LINE = "hmac-sha256:ilnp-update:" + "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="


def test_key_line_is_parsed_with_comments_ignored() -> None:
    key = parse_tsig_key(f"# the lab's key\n\n{LINE}\n")
    assert key == KEY
    assert key.name == "ilnp-update." and key.algorithm == "hmac-sha256"
    assert "AAEC" not in repr(key) and "secret" not in repr(key)
    assert parse_tsig_key(format_tsig_key(key, "a\ncomment")) == key
    assert format_tsig_key(key) == LINE + "\n"


@given(st.sampled_from(["hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512"]), labels,
       st.binary(min_size=16, max_size=64))
def test_key_round_trip(algorithm: str, name: str, secret: bytes) -> None:
    key = TsigKey(name, algorithm, secret)
    assert parse_tsig_key(format_tsig_key(key)) == key


@pytest.mark.parametrize(("text", "match"), [
    ("", "exactly one line"),
    ("# only a comment\n", "exactly one line"),
    (f"{LINE}\n{LINE}\n", "exactly one line ALGORITHM:NAME:SECRET, not 2"),
    ("key:\n  - id: k\n    algorithm: hmac-sha256\n    secret: AAAA\n", "knot.conf YAML"),
    ("ilnp-update:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "not ALGORITHM:NAME:SECRET"),
    ("hmac-sha256::AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "not ALGORITHM:NAME:SECRET"),
    ("hmac-sha256:k:not base64!", "not base64"),
    ("hmac-sha256:k:AAECAwQ=", "at least 16 bytes"),
    ("hmac-md5:k:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "hmac-md5.*is not one of"),
    ("hmac-sha256:a..b:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=", "not a DNS name"),
])
def test_malformed_key_files_are_refused(text: str, match: str) -> None:
    with pytest.raises(TsigKeyFileError, match=match):
        parse_tsig_key(text, "k.key")


def test_keymgr_output_makes_a_key_file() -> None:
    """`keymgr -t` prints the line behind '# ' (the module's docstring says so)."""
    if shutil.which("keymgr") is None:
        pytest.skip("keymgr (package knot) is not installed")
    out = subprocess.run(["keymgr", "-t", "ilnp-update", "hmac-sha256"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    with pytest.raises(TsigKeyFileError, match=r"knot\.conf YAML"):
        parse_tsig_key(out)
    first = out.splitlines()[0]
    assert first.startswith("# ")
    key = parse_tsig_key(first[2:])
    assert key.name == "ilnp-update." and len(key.secret) == 32


def test_read_and_write_key_file(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_tsig_key(str(path), KEY, "the lab's key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_tsig_key(str(path)) == KEY
    with pytest.raises(FileExistsError):
        write_tsig_key(str(path), generate_tsig_key("other"))
    assert read_tsig_key(str(path)) == KEY


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_key_file_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    path.write_text(LINE + "\n")
    path.chmod(mode)
    with pytest.raises(TsigKeyFileError, match=f"mode {mode:04o}.*chmod 600"):
        read_tsig_key(str(path))


def test_unusable_key_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TsigKeyFileError, match="cannot open TSIG key file"):
        read_tsig_key(str(tmp_path / "missing.key"))
    real = tmp_path / "real.key"
    real.write_text(LINE)
    real.chmod(0o600)
    (tmp_path / "link.key").symlink_to(real)
    with pytest.raises(TsigKeyFileError, match="cannot open"):
        read_tsig_key(str(tmp_path / "link.key"))
    with pytest.raises(TsigKeyFileError, match="not a regular file"):
        read_tsig_key(str(tmp_path))
    binary = tmp_path / "bin.key"
    binary.write_bytes(b"\xff\xfe" * 10)
    binary.chmod(0o600)
    with pytest.raises(TsigKeyFileError, match="not text"):
        read_tsig_key(str(binary))
    big = tmp_path / "big.key"
    big.write_text("#" * 5000)
    big.chmod(0o600)
    with pytest.raises(TsigKeyFileError, match="larger than a key file"):
        read_tsig_key(str(big))


def test_generated_keys_differ_and_are_sha256() -> None:
    a, b = generate_tsig_key("k"), generate_tsig_key("k")
    assert a != b and a.algorithm == "hmac-sha256" and len(a.secret) == 32


# --- the I/O layer against loopback sockets ---------------------------------------------------
@pytest.fixture
def udp_server() -> Iterator[Callable[[Callable[[bytes, int], bytes | None]], int]]:
    """A loopback UDP server answering each datagram with handler(data, count)."""
    socks: list[socket.socket] = []
    threads: list[threading.Thread] = []
    done = threading.Event()

    def start(handler: Callable[[bytes, int], bytes | None]) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.05)  # to notice the end of the test
        socks.append(sock)

        def serve() -> None:
            count = 0
            while not done.is_set():
                try:
                    data, peer = sock.recvfrom(65535)
                except TimeoutError:
                    continue
                count += 1
                answer = handler(data, count)
                if answer is not None:
                    sock.sendto(answer, peer)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return int(sock.getsockname()[1])

    yield start
    done.set()
    for thread in threads:
        thread.join(5)
    for sock in socks:
        sock.close()


def _apply(data: bytes, rcode: int = dns.rcode.NOERROR) -> bytes:
    request = dns.message.from_wire(data, keyring=KEY.dns_key())
    response = dns.message.make_response(request)
    response.set_rcode(rcode)
    return response.to_wire()


def test_publish_over_udp_sends_again_after_a_lost_datagram(udp_server: Callable[
        [Callable[[bytes, int], bytes | None]], int]) -> None:
    seen: list[int] = []

    def drop_first(data: bytes, count: int) -> bytes | None:
        seen.append(count)
        return None if count == 1 else _apply(data)

    port = udp_server(drop_first)
    publish("127.0.0.1", port, ZONE, MN, KEY, timeout=5, transport="udp")
    assert seen == [1, 2]


def test_a_refusal_over_udp_names_the_rcode(udp_server: Callable[
        [Callable[[bytes, int], bytes | None]], int]) -> None:
    port = udp_server(lambda data, _: _apply(data, dns.rcode.REFUSED))
    with pytest.raises(DnsUpdateError, match="refused: REFUSED") as info:
        publish("127.0.0.1", port, ZONE, MN, KEY, timeout=5, transport="udp")
    assert info.value.rcode == "REFUSED"


def test_no_answer_is_a_bounded_update_error(udp_server: Callable[
        [Callable[[bytes, int], bytes | None]], int]) -> None:
    port = udp_server(lambda data, _: None)
    with pytest.raises(DnsUpdateError, match=r"no answer within 0\.3 s") as info:
        publish("127.0.0.1", port, ZONE, MN, KEY, timeout=0.3, transport="udp")
    assert info.value.rcode is None


def test_publish_over_tcp_to_a_closed_port_is_an_update_error() -> None:
    with socket.socket() as sock:  # a port surely closed: bound, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        with pytest.raises(DnsUpdateError, match=r"[Cc]onnection refused"):
            publish("127.0.0.1", port, ZONE, MN, KEY, timeout=2)


def test_publish_over_tcp() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        received: list[bytes] = []

        def serve() -> None:
            conn, _ = server.accept()
            with conn:
                length = int.from_bytes(conn.recv(2), "big")
                data = b""
                while len(data) < length:
                    data += conn.recv(length - len(data))
                received.append(data)
                answer = _apply(data)
                conn.sendall(len(answer).to_bytes(2, "big") + answer[:5])
                conn.sendall(answer[5:])  # in two pieces: the client reads on

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        publish("127.0.0.1", port, ZONE, MN, KEY, timeout=5)
        thread.join(5)
    assert _adds(dns.message.from_wire(received[0], keyring=KEY.dns_key())) == _adds(
        update_message(ZONE, MN, KEY))


def test_bad_arguments_are_typed_errors_without_io() -> None:
    with pytest.raises(DnsUpdateError, match="IP address"):
        publish("ns.ilnp.test", 53, ZONE, MN, KEY)
    with pytest.raises(DnsUpdateError, match=r"port 1\.\.65535"):
        publish("127.0.0.1", 0, ZONE, MN, KEY)
    with pytest.raises(DnsUpdateError, match="tcp or udp"):
        send_update("127.0.0.1", 53, update_message(ZONE, MN, KEY), 1,
                    transport="sctp")  # type: ignore[arg-type]
    with pytest.raises(DnsLookupError, match="IP address") as info:
        resolve("ns.ilnp.test", 53, "mn.ilnp.test.")
    assert info.value.reason is LookupFailure.FAILED


def test_resolve_without_an_answer_is_a_timeout(udp_server: Callable[
        [Callable[[bytes, int], bytes | None]], int]) -> None:
    port = udp_server(lambda data, _: None)
    with pytest.raises(DnsLookupError, match=r"within 0\.5 s") as info:
        resolve("127.0.0.1", port, "mn.ilnp.test.", timeout=0.5)
    assert info.value.reason is LookupFailure.TIMEOUT


def test_resolve_asks_only_the_given_server(udp_server: Callable[
        [Callable[[bytes, int], bytes | None]], int]) -> None:
    asked: list[tuple[str, int]] = []

    def answer(data: bytes, _: int) -> bytes:
        query = dns.message.from_wire(data)
        question = query.question[0]
        asked.append((question.name.to_text(), question.rdtype))
        assert isinstance(query, dns.message.QueryMessage)
        return _answer(query, MN).to_wire()

    port = udp_server(answer)
    assert resolve("127.0.0.1", port, "mn.ilnp.test", timeout=5) == MN
    assert asked == [("mn.ilnp.test.", NID), ("mn.ilnp.test.", L64)]

