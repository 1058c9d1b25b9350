"""Discovery hellos (ilnp.hello): the documented example, encode/decode round trips over every
field (hypothesis), and malformed input: every reason the module documents (`magic`, `size`,
`json`, `field`) and never another exception, for random bytes and random JSON alike."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipshift.ilnp.hello import MAGIC, MAX_LOCATORS, MAX_SIZE, Hello, HelloError, decode
from ipshift.packet.errors import PacketError

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
REASONS = {"magic", "size", "json", "field"}

EXAMPLE = {"name": "mn.ilnp.test.", "nid": "0000:0000:0000:0011", "solicit": False,
           "router": False, "locators": [["2001:db8:1::/64", 10], ["2001:db8:2::/64", 20]],
           "interval": 5.0, "ttl": 3}


def wire(body: Any) -> bytes:
    return MAGIC + json.dumps(body).encode()


def refused(data: bytes) -> HelloError:
    with pytest.raises(HelloError) as caught:
        decode(data)
    assert caught.value.reason in REASONS
    assert isinstance(caught.value, PacketError)  # counted like every parser's error
    return caught.value


DELETE = object()  # with_field: the key is left out


def with_field(key: str, value: Any) -> dict[str, Any]:
    body = dict(EXAMPLE)
    if value is DELETE:
        del body[key]
    else:
        body[key] = value
    return body


# --- what a hello is --------------------------------------------------------------------------
def test_the_documented_example_decodes() -> None:
    hello = decode(wire(EXAMPLE))
    assert hello == Hello("mn.ilnp.test.", 0x11,
                          ((0x20010DB800010000, 10), (0x20010DB800020000, 20)),
                          router=False, solicit=False, interval=5.0, ttl=3)


def test_encode_is_the_magic_and_compact_json() -> None:
    hello = Hello("r.ilnp.test.", 0x0211_22FF_FE33_4455, ((0x20010DB8000A0000, 0),),
                  router=True, solicit=True, interval=2.5, ttl=0)
    data = hello.encode()
    assert data.startswith(MAGIC)
    body = json.loads(data[len(MAGIC):])
    assert body == {"name": "r.ilnp.test.", "nid": "0211:22ff:fe33:4455", "solicit": True,
                    "router": True, "interval": 2.5, "ttl": 0,
                    "locators": [["2001:db8:a::/64", 0]]}
    assert b" " not in data[len(MAGIC):]
    assert decode(data) == hello


def test_missing_flags_and_interval_take_their_defaults() -> None:
    body = {"name": "cn.", "nid": "0000:0000:0000:0022", "locators": []}
    hello = decode(wire(body))
    assert (hello.router, hello.solicit, hello.interval, hello.locators) == \
        (False, False, 5.0, ())


def test_decode_takes_upper_case_hex_and_an_int_interval() -> None:
    hello = decode(wire(with_field("nid", "ABCD:0000:00Ef:0011") | {"interval": 7}))
    assert hello.nid == 0xABCD_0000_00EF_0011
    assert hello.interval == 7.0 and isinstance(hello.interval, float)


names = st.text(min_size=1, max_size=253)
nids = st.integers(1, 2**64 - 1)
locator_lists = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 0xFFFF)),
                         max_size=MAX_LOCATORS).map(tuple)
intervals = st.floats(0.1, 3600, allow_nan=False, allow_infinity=False)


@FUZZ
@given(name=names, nid=nids, locators=locator_lists, router=st.booleans(),
       solicit=st.booleans(), interval=intervals, ttl=st.integers(0, 16))
def test_round_trip(name: str, nid: int, locators: tuple[tuple[int, int], ...],
                    router: bool, solicit: bool, interval: float, ttl: int) -> None:
    hello = Hello(name, nid, locators, router, solicit, interval, ttl)
    try:
        data = hello.encode()
    except ValueError as exc:  # too many long locators or escaped characters
        assert "over 1200" in str(exc)
        return
    assert len(data) <= MAX_SIZE
    assert decode(data) == hello


def test_encode_refuses_a_hello_over_max_size() -> None:
    hello = Hello("\u00e9" * 253, 1, tuple((0xFFFF_FFFF_FFFF_0000 + i, 65535)
                                           for i in range(MAX_LOCATORS)))
    with pytest.raises(ValueError, match="over 1200"):
        hello.encode()


def test_a_hello_of_max_size_decodes_and_one_byte_more_does_not() -> None:
    exact = wire(EXAMPLE).ljust(MAX_SIZE)  # JSON may end in white space
    assert decode(exact) == decode(wire(EXAMPLE))
    assert refused(exact + b" ").reason == "size"


# --- malformed input --------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"", b"ILNP-HELLO/1", b"ILNP-HELLO/2 {}", b"ilnp-hello/1 {}",
                                  b"\x00" + MAGIC + b"{}", json.dumps(EXAMPLE).encode()])
def test_without_the_magic(data: bytes) -> None:
    assert refused(data).reason == "magic"


@pytest.mark.parametrize("rest", [b"", b"{", b"{\"name\": }", b"\xff\xfe{}", b"nul",
                                  b"{} {}", b"[1,]", b"\x00"])
def test_not_json(rest: bytes) -> None:
    error = refused(MAGIC + rest)
    assert error.reason == "json"
    assert "not JSON" in str(error)


def test_oversized_is_refused_before_it_is_read() -> None:
    assert refused(b"x" * (MAX_SIZE + 1)).reason == "size"


FIELD_CASES: list[tuple[str, Any, str]] = [
    ("name", DELETE, "name"),
    ("name", "", "name"),
    ("name", "x" * 254, "name"),
    ("name", 7, "name"),
    ("nid", DELETE, "nid"),
    ("nid", 17, "nid"),
    ("nid", "0:0:0:11", "nid"),
    ("nid", "0000:0000:0000:0000", "nid: not zero"),
    ("nid", "0000:0000:0000:0011:0000", "nid"),
    ("nid", "0000:0000:0000:00g1", "nid"),
    ("nid", "0000:0000:0000:+011", "nid"),
    ("nid", "0000:0000:0000: 011", "nid"),
    ("nid", "0000:0000:0000:\u0660\u0660\u0661\u0661", "nid"),  # Arabic-Indic digits
    ("router", 1, "router"),
    ("router", "yes", "router"),
    ("solicit", None, "solicit"),
    ("interval", 0.05, "interval"),
    ("interval", 3601, "interval"),
    ("interval", True, "interval"),
    ("interval", "5", "interval"),
    ("ttl", -1, "ttl"),
    ("ttl", 17, "ttl"),
    ("ttl", 1.0, "ttl"),
    ("ttl", False, "ttl"),
    ("locators", DELETE, "locators"),
    ("locators", {"2001:db8:1::/64": 10}, "locators"),
    ("locators", [["2001:db8:1::/64", 10]] * (MAX_LOCATORS + 1), "locators"),
    ("locators", [["2001:db8:1::/64"]], "locator"),
    ("locators", [["2001:db8:1::/64", 10, 0]], "locator"),
    ("locators", [[10, "2001:db8:1::/64"]], "locator"),
    ("locators", [["2001:db8:1::/64", -1]], "locator"),
    ("locators", [["2001:db8:1::/64", 65536]], "locator"),
    ("locators", [["2001:db8:1::/64", True]], "locator"),
    ("locators", [["2001:db8:1::/64", 1.5]], "locator"),
    ("locators", ["2001:db8:1::/64"], "locator"),
    ("locators", [["2001:db8:1::/48", 10]], "locator: a /64"),
    ("locators", [["2001:db8:1::1/64", 10]], "not an IPv6 prefix"),
    ("locators", [["192.0.2.0/24", 10]], "not an IPv6 prefix"),
    ("locators", [["mn.ilnp.test.", 10]], "not an IPv6 prefix"),
]


@pytest.mark.parametrize("key,value,says", FIELD_CASES,
                         ids=[f"{key}={value!r}"[:40] for key, value, _ in FIELD_CASES])
def test_each_field_wrong(key: str, value: Any, says: str) -> None:
    error = refused(wire(with_field(key, value)))
    assert error.reason == "field"
    assert says in str(error)


@pytest.mark.parametrize("body", [[], "hello", 5, None, [EXAMPLE]])
def test_not_an_object(body: Any) -> None:
    error = refused(wire(body))
    assert error.reason == "field" and "not an object" in str(error)


def test_deeply_nested_json_is_a_hello_error() -> None:
    assert refused(MAGIC + b"[" * (MAX_SIZE - len(MAGIC))).reason == "json"


@FUZZ
@given(st.binary(max_size=MAX_SIZE + 20))
def test_random_bytes(data: bytes) -> None:
    for candidate in (data, MAGIC + data):
        try:
            decode(candidate)
        except HelloError as exc:
            assert exc.reason in REASONS


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@FUZZ
@given(st.dictionaries(st.sampled_from([*sorted(EXAMPLE), "extra"]), json_values, max_size=8),
       st.booleans())
def test_random_json_objects(changes: dict[str, Any], start_from_example: bool) -> None:
    body = (dict(EXAMPLE) if start_from_example else {}) | changes
    try:
        hello = decode(wire(body))
    except HelloError as exc:
        assert exc.reason in {"field", "size"}
        return
    assert decode(hello.encode()) == hello  # what decodes encodes back to the same


@FUZZ
@given(json_values)
def test_random_json_values(value: Any) -> None:
    try:
        decode(wire(value))
    except HelloError as exc:
        assert exc.reason in {"field", "size"}
