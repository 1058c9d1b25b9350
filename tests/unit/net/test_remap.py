"""Flow remaps without a kernel: validation, the lookups and JSON commands a remap becomes, the
fixed table body, clash detection, and reading remaps back from a listing (round trip and
fuzzing)."""

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net.errors import ParseError
from ipshift.net.nft import NftError
from ipshift.net.nfttable import OwnedTable
from ipshift.net.remap import (
    Direction,
    FlowRemaps,
    Lookup,
    Remap,
    RemapError,
    RemapParseError,
    all_map_names,
    describe,
    element_commands,
    lookups,
    remap_body,
)

MOVER = Remap("tcp", "192.0.2.10", 40000, "198.51.100.20", 443, new_local="203.0.113.10")


# --- validation ---------------------------------------------------------------------------------
def test_unset_fields_keep_the_socket_side_values():
    assert MOVER.wire == ("203.0.113.10", 40000, "198.51.100.20", 443)
    assert MOVER.inner == ("192.0.2.10", 40000, "198.51.100.20", 443)
    assert Remap("tcp", "192.0.2.10", 40000, "198.51.100.20", 443, "203.0.113.10",
                          40000, "198.51.100.20", 443) == MOVER
    v6 = Remap("udp", "2001:DB8::1", 53, "2001:db8:0::2", 53, new_peer="2001:db8::0:3")
    assert (v6.local, v6.peer, v6.new_peer, v6.version) == ("2001:db8::1", "2001:db8::2",
                                                            "2001:db8::3", 6)
    assert MOVER.version == 4
    assert MOVER.describe() == ("tcp 192.0.2.10:40000 - 198.51.100.20:443 as "
                                "203.0.113.10:40000 - 198.51.100.20:443")
    echo = Remap("icmp", "2001:db8::1", 7, "2001:db8::2", new_local_port=9)
    assert echo.describe() == "icmp [2001:db8::1] id 7 - [2001:db8::2] id 0 as " \
                              "[2001:db8::1] id 9 - [2001:db8::2] id 0"


@pytest.mark.parametrize("kwargs, message", [
    ({"proto": "sctp"}, "protocol 'sctp' is not one of tcp, udp, icmp"),
    ({"local": "192.0.2.300"}, "local '192.0.2.300' is not an IP address"),
    ({"local": "0.0.0.0"}, "local 0.0.0.0 is not a unicast address"),
    ({"new_peer": "ff02::1"}, "new_peer ff02::1 is not a unicast address"),
    ({"new_local": "2001:db8::1"}, "mixes IPv4 and IPv6"),
    ({"local_port": 70000}, "local_port 70000 is not a port number"),
    ({"peer_port": True}, "peer_port True is not a port number"),
    ({"new_local_port": -2}, "new_local_port -2 is not a port number"),
    ({"new_local": "192.0.2.10"}, "changes nothing"),
    ({"proto": "icmp", "peer_port": 443}, "leave the peer ports 0"),
])
def test_bad_remaps_are_one_line_errors(kwargs, message):
    fields = {"proto": "tcp", "local": "192.0.2.10", "local_port": 40000,
              "peer": "198.51.100.20", "peer_port": 443, "new_local": "203.0.113.10"}
    fields.update(kwargs)
    with pytest.raises(RemapError) as info:
        Remap(**fields)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


# --- what a remap becomes -----------------------------------------------------------------------
def test_a_mover_remap_is_one_element_per_direction():
    out = list(lookups(MOVER, Direction.OUTBOUND))
    key = ("tcp", "192.0.2.10", 40000, "198.51.100.20", 443)
    assert out == [Lookup("out4_dport", key, None), Lookup("out4_daddr", key, None),
                   Lookup("out4_sport", key, None), Lookup("out4_saddr", key, "203.0.113.10")]
    wire_in = ("tcp", "198.51.100.20", 443, "203.0.113.10", 40000)
    assert [lk for lk in lookups(MOVER, Direction.INBOUND) if lk.value is not None] == [
        Lookup("in4_daddr", wire_in, "192.0.2.10")]
    assert element_commands("inet", "t", [(MOVER, Direction.BOTH)]) == [
        {"add": {"element": {"family": "inet", "table": "t", "name": "in4_daddr", "elem": [
            [{"concat": list(wire_in)}, "192.0.2.10"]]}}},
        {"add": {"element": {"family": "inet", "table": "t", "name": "out4_saddr", "elem": [
            [{"concat": list(key)}, "203.0.113.10"]]}}},
    ]
    assert element_commands("inet", "t", delete=[(MOVER, Direction.INBOUND)]) == [
        {"delete": {"element": {"family": "inet", "table": "t", "name": "in4_daddr",
                                "elem": [{"concat": list(wire_in)}]}}}]


def test_later_lookups_see_what_earlier_ones_changed():
    both = Remap("udp", "192.0.2.10", 53, "198.51.100.20", 5353, "203.0.113.10", 1053,
                 "198.51.100.30", 53)
    out = [lk for lk in lookups(both, Direction.OUTBOUND)]
    # outbound: ports first, then addresses; each key holds the changes made before it
    assert out == [
        Lookup("out4_dport", ("udp", "192.0.2.10", 53, "198.51.100.20", 5353), 53),
        Lookup("out4_daddr", ("udp", "192.0.2.10", 53, "198.51.100.20", 53), "198.51.100.30"),
        Lookup("out4_sport", ("udp", "192.0.2.10", 53, "198.51.100.30", 53), 1053),
        Lookup("out4_saddr", ("udp", "192.0.2.10", 1053, "198.51.100.30", 53), "203.0.113.10"),
    ]
    inbound = [lk for lk in lookups(both, Direction.INBOUND)]
    # inbound: addresses first, then ports
    assert [lk.map for lk in inbound] == ["in4_saddr", "in4_daddr", "in4_sport", "in4_dport"]
    assert inbound[0].key == ("udp", "198.51.100.30", 53, "203.0.113.10", 1053)
    assert inbound[-1] == Lookup("in4_dport",
                                 ("udp", "198.51.100.20", 5353, "192.0.2.10", 1053), 53)
    echo = Remap("icmp", "2001:db8::1", 7, "2001:db8::2", new_local="2001:db8::5",
                 new_local_port=9)
    assert [(lk.map, lk.value) for lk in lookups(echo, Direction.BOTH)
            if lk.value is not None] == [
        ("out6_icmp_id", 9), ("out6_icmp_saddr", "2001:db8::5"),
        ("in6_icmp_daddr", "2001:db8::1"), ("in6_icmp_id", 7)]


def test_the_fixed_body_places_each_lookup_in_its_hook():
    body = remap_body()
    chains = {}
    current = None
    for line in body.splitlines():
        if line.startswith("chain ") and line.endswith("{"):
            current = line.split()[1]
            chains[current] = []
        elif current and line == "}":
            current = None
        elif current:
            chains[current].append(line)
    assert chains["prerouting"][0] == ("type filter hook prerouting priority -300; "
                                       "policy accept;")
    assert chains["postrouting"][0] == ("type filter hook postrouting priority 300; "
                                        "policy accept;")
    assert "chain output { type route hook output priority 300; policy accept; " \
           "jump outbound_dest; }" in body
    assert "chain forward { type filter hook forward priority 300; policy accept; " \
           "jump outbound_dest; }" in body

    def used(chain):
        return [line.split("map @")[1].split()[0] for line in chains[chain] if "map @" in line]

    assert used("outbound_dest")[:3] == ["out4_dport"] * 3  # tcp, udp, udp without checksum
    assert set(used("outbound_dest")) == {"out4_dport", "out6_dport", "out4_daddr",
                                          "out6_daddr", "out4_icmp_daddr", "out6_icmp_daddr"}
    assert set(used("postrouting")) == {"out4_sport", "out6_sport", "out4_saddr", "out6_saddr",
                                        "out4_icmp_id", "out6_icmp_id", "out4_icmp_saddr",
                                        "out6_icmp_saddr"}
    assert set(used("prerouting")) == {n for n in all_map_names() if n.startswith("in")}
    # ports are set by protocol (checksum fixed), raw only when a UDP checksum is 0
    assert ("meta l4proto udp udp checksum 0 @th,0,16 set meta l4proto . ip saddr . th sport "
            ". ip daddr . th dport map @out4_sport counter name \"out4_sport\"") in body
    assert "meta l4proto tcp tcp dport set" in body and "udp checksum != 0 udp dport set" in body
    for name in all_map_names():
        assert f"map {name} {{" in body and f"counter {name} {{ }}" in body


# --- FlowRemaps with a stand-in for libnftables -------------------------------------------------
class FakeNft:
    """Keeps map elements as the kernel would, and fails like it on a double add or a missing
    delete, so the commands FlowRemaps sends are checked for consistency too."""

    def __init__(self):
        self.maps = {name: {} for name in all_map_names()}
        self.calls = 0
        self.fail_next = False
        self.comment = None

    def run(self, text, *, echo=False):
        self.calls += 1
        self.maps = {name: {} for name in all_map_names()}
        return ""

    def table_comment(self, family, name):
        return self.comment

    def delete_table(self, family, name, *, missing_ok=True):
        return True

    def run_json(self, commands, *, echo=False):
        self.calls += 1
        if self.fail_next:
            self.fail_next = False
            raise NftError("nft: Could not process rule: File exists")
        maps = copy.deepcopy(self.maps)
        for command in commands:
            (verb, body), = command.items()
            elems = body["element"]["elem"]
            target = maps[body["element"]["name"]]
            for elem in elems:
                key = json.dumps(elem[0] if verb == "add" else elem)
                if verb == "add":
                    assert key not in target, "element added twice"
                    target[key] = elem[1]
                else:
                    assert key in target, "deleting an element that is not there"
                    del target[key]
        self.maps = maps
        return {}

    def listing(self):
        return {"nftables": [{"metainfo": {"json_schema_version": 1}}] + [
            {"map": {"family": "inet", "name": name, "table": "t",
                     **({"elem": [[json.loads(k), v] for k, v in elems.items()]}
                        if elems else {})}}
            for name, elems in self.maps.items()]}

    def list_table(self, family, name):
        return self.listing()


def _remaps():
    nft = FakeNft()
    remaps = FlowRemaps(OwnedTable(nft, "inet", "unit", "x"))
    remaps.install()
    return nft, remaps


def test_add_remove_and_status():
    _nft, remaps = _remaps()
    echo = Remap("icmp", "192.0.2.10", 7, "198.51.100.20", new_local_port=8)
    assert remaps.add([MOVER, echo], Direction.INBOUND) == 2
    assert remaps.add([MOVER, echo]) == 2  # the outbound half
    assert remaps.add([MOVER]) == 0
    assert remaps.read_back() == {MOVER: Direction.BOTH, echo: Direction.BOTH}
    assert remaps.status() == {
        "table": "inet ipshift_unit_x", "remaps": 2, "inbound": 2, "outbound": 2,
        "elements": 4, "by_proto": {"tcp": 1, "udp": 0, "icmp": 1}, "added": 4,
        "removed": 0, "transactions": 2, "failed_transactions": 0}
    assert remaps.remove([echo], Direction.OUTBOUND) == 1
    assert remaps.remaps() == {MOVER: Direction.BOTH, echo: Direction.INBOUND}
    assert remaps.remove([echo, echo]) == 1
    assert remaps.remove([echo]) == 0
    assert len(remaps) == 1 and remaps.status()["elements"] == 2
    assert remaps.read_back() == {MOVER: Direction.BOTH}


def test_a_flow_that_moves_again_is_replaced_in_one_transaction():
    nft, remaps = _remaps()
    remaps.add([MOVER])
    again = Remap("tcp", "192.0.2.10", 40000, "198.51.100.20", 443, new_local="203.0.113.11")
    with pytest.raises(RemapError, match="clashes with"):
        remaps.add([again])
    calls = nft.calls
    assert remaps.update(add=[again], remove=[MOVER]) == (1, 1)
    assert nft.calls == calls + 1
    assert remaps.read_back() == {again: Direction.BOTH}


def test_clashing_remaps_are_refused_with_one_line():
    _nft, remaps = _remaps()
    remaps.add([MOVER])
    # same socket-side tuple, another wire address
    twin = Remap("tcp", "192.0.2.10", 40000, "198.51.100.20", 443, new_local="203.0.113.99")
    # another flow whose packets, after the local port is set, look like MOVER's
    lookalike = Remap("tcp", "192.0.2.10", 40001, "198.51.100.20", 443, new_local_port=40000)
    # another flow rewritten to MOVER's wire tuple: replies could not be told apart
    same_wire = Remap("tcp", "192.0.2.11", 40000, "198.51.100.20", 443,
                      new_local="203.0.113.10")
    for bad in (twin, lookalike, same_wire):
        with pytest.raises(RemapError) as info:
            remaps.add([bad])
        assert "remove one first" in str(info.value) and "\n" not in str(info.value)
    # within one batch too, and nothing of the batch is installed
    fresh = Remap("udp", "192.0.2.10", 5000, "198.51.100.20", 53, new_local="203.0.113.10")
    with pytest.raises(RemapError):
        remaps.add([fresh, twin])
    assert remaps.remaps() == {MOVER: Direction.BOTH}
    with pytest.raises(RemapError, match="not a Remap"):
        remaps.add(["tcp 192.0.2.1"])


def test_a_failed_transaction_changes_nothing():
    nft, remaps = _remaps()
    remaps.add([MOVER], Direction.INBOUND)
    nft.fail_next = True
    with pytest.raises(NftError):
        remaps.update(add=[MOVER], remove=[MOVER])
    assert remaps.remaps() == {MOVER: Direction.INBOUND}
    assert remaps.status()["failed_transactions"] == 1
    assert remaps.add([MOVER], Direction.OUTBOUND) == 1
    assert remaps.read_back() == {MOVER: Direction.BOTH}


def test_only_inet_tables():
    with pytest.raises(ValueError, match="inet"):
        FlowRemaps(OwnedTable(FakeNft(), "ip", "unit", "x"))


# --- round trip and fuzzing ---------------------------------------------------------------------
V4 = ["192.0.2.1", "192.0.2.2", "198.51.100.1", "203.0.113.1"]
V6 = ["2001:db8::1", "2001:db8::2", "2001:db8:1::1", "2001:db8:2::1"]
PORTS = [0, 1, 53, 443, 40000, 65535]


@st.composite
def remaps(draw):
    pool = draw(st.sampled_from([V4, V6]))
    proto = draw(st.sampled_from(["tcp", "udp", "icmp"]))
    addr = st.sampled_from(pool)
    port = st.sampled_from(PORTS)
    peer_port = 0 if proto == "icmp" else draw(port)
    new_peer_port = 0 if proto == "icmp" else draw(port)
    try:
        return Remap(proto, draw(addr), draw(port), draw(addr), peer_port, draw(addr),
                     draw(port), draw(addr), new_peer_port)
    except RemapError:
        return MOVER


OPS = st.lists(st.tuples(st.sampled_from(["add", "remove"]), remaps(),
                         st.sampled_from([Direction.INBOUND, Direction.OUTBOUND,
                                          Direction.BOTH])), max_size=25)


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_build_then_describe_round_trip(ops):
    nft, flows = _remaps()
    for verb, remap, direction in ops:
        try:
            if verb == "add":
                flows.add([remap], direction)
            else:
                flows.remove([remap], direction)
        except RemapError:
            continue
    installed = flows.remaps()
    found = describe(nft.listing())
    # what the kernel does is what the remaps installed say, element for element
    in_maps = _in_maps(nft)
    assert _elements(found) == _elements(installed) == in_maps
    assert flows.status()["elements"] == len(in_maps)
    inbound_flows = [r.inner for r, d in installed.items() if d & Direction.INBOUND]
    if len(inbound_flows) == len(set(inbound_flows)):
        # a flow arriving under one wire tuple only: the listing says exactly which remaps
        assert found == installed


def _in_maps(nft):
    return {(name, tuple(json.loads(key)["concat"]), value)
            for name, elems in nft.maps.items() for key, value in elems.items()}


def _elements(remaps):
    return {(lk.map, tuple(lk.key), lk.value) for remap, direction in remaps.items()
            for lk in lookups(remap, direction) if lk.value is not None}


def test_one_flow_may_arrive_under_two_wire_tuples():
    """While a peer learns of a move, a flow is let in under its old and its new wire tuple;
    removing the old one keeps the element the two share."""
    nft, flows = _remaps()
    old = Remap("tcp", "203.0.113.5", 22, "192.0.2.10", 40000, new_peer="198.51.100.10",
                new_local="203.0.113.50")
    new = Remap("tcp", "203.0.113.5", 22, "192.0.2.10", 40000, new_peer="198.51.100.20",
                new_local="203.0.113.50")
    flows.add([old], Direction.BOTH)
    flows.update(add=[new], direction=Direction.INBOUND)
    flows.update(add=[new], remove=[old], direction=Direction.OUTBOUND)
    assert flows.remaps() == {old: Direction.INBOUND, new: Direction.BOTH}
    flows.remove([old], Direction.INBOUND)
    assert _elements({new: Direction.BOTH}) == _in_maps(nft)
    # another flow still may not take what the first one's packets look like
    with pytest.raises(RemapError, match="clashes"):
        flows.add([Remap("tcp", "203.0.113.9", 22, "192.0.2.10", 40000,
                         new_peer="198.51.100.20", new_local="203.0.113.50")],
                  Direction.INBOUND)


@settings(max_examples=200, deadline=None)
@given(st.lists(remaps(), max_size=20))
def test_a_batch_round_trips_through_the_commands(batch):
    nft, flows = _remaps()
    try:
        flows.add(batch)
    except RemapError:
        return
    assert describe(nft.listing()) == {r: Direction.BOTH for r in batch}


def test_describe_accepts_protocol_numbers_and_ignores_other_maps():
    nft, flows = _remaps()
    flows.add([MOVER])
    listing = nft.listing()
    for item in listing["nftables"]:
        for elem in item.get("map", {}).get("elem", []):
            elem[0]["concat"][0] = 6
    listing["nftables"].append({"map": {"name": "other", "elem": [["x", "y"]]}})
    listing["nftables"].append({"chain": {"name": "prerouting"}})
    assert describe(listing) == {MOVER: Direction.BOTH}


def _broken_listings():
    nft, flows = _remaps()
    flows.add([MOVER, Remap("udp", "2001:db8::1", 53, "2001:db8::2", 53, new_local_port=99)])
    good = nft.listing()
    yield {}
    yield {"nftables": "x"}
    for mutate in range(8):
        listing = copy.deepcopy(good)
        maps = [i["map"] for i in listing["nftables"] if "elem" in i.get("map", {})]
        elem = maps[0]["elem"][0]
        if mutate == 0:
            elem[0]["concat"][1] = "2001:db8::9"  # wrong family
        elif mutate == 1:
            elem[0]["concat"][2] = 70000
        elif mutate == 2:
            elem[0]["concat"][0] = "sctp"
        elif mutate == 3:
            elem[1] = "not an address"
        elif mutate == 4:
            maps[0]["elem"] = "x"
        elif mutate == 5:
            maps[0]["elem"].append(copy.deepcopy(elem))  # a key twice
        elif mutate == 6:
            maps[0]["elem"][0] = {"elem": {"val": elem[0]}}
        elif mutate == 7:
            elem[0]["concat"].pop()
        yield listing


@pytest.mark.parametrize("listing", list(_broken_listings()))
def test_malformed_listings_raise_one_typed_error(listing):
    with pytest.raises(RemapParseError) as info:
        describe(listing)
    assert "\n" not in str(info.value) and isinstance(info.value, ParseError)


def test_elements_that_do_not_form_whole_remaps_are_refused():
    # an identity element: the kernel could hold it, but no remap makes one
    listing = {"nftables": [{"map": {"name": "out4_saddr", "elem": [
        [{"concat": ["tcp", "192.0.2.1", 1, "192.0.2.2", 2]}, "192.0.2.1"]]}}]}
    with pytest.raises(RemapParseError, match="changes nothing"):
        describe(listing)
    # two elements rewriting to the same tuple
    listing = {"nftables": [{"map": {"name": "out4_saddr", "elem": [
        [{"concat": ["tcp", "192.0.2.1", 1, "192.0.2.2", 2]}, "192.0.2.9"],
        [{"concat": ["tcp", "192.0.2.3", 1, "192.0.2.2", 2]}, "192.0.2.9"]]}}]}
    with pytest.raises(RemapParseError, match="same tuple"):
        describe(listing)


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12)
    | st.sampled_from(["tcp", "udp", "192.0.2.1", "2001:db8::1", "out4_saddr", "in6_icmp_id"]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.sampled_from(["nftables", "map", "name", "elem", "concat", "x"]), inner, max_size=4),
    max_leaves=30)


@settings(max_examples=500, deadline=None)
@given(JSONISH)
def test_describe_fuzz(doc):
    try:
        result = describe(doc)
    except RemapParseError:
        return
    assert all(isinstance(r, Remap) for r in result)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(all_map_names()),
       st.lists(st.tuples(st.lists(JSONISH, max_size=6), JSONISH), max_size=4))
def test_describe_fuzz_elements(name, elems):
    listing = {"nftables": [{"map": {"name": name,
                                     "elem": [[{"concat": k}, v] for k, v in elems]}}]}
    try:
        describe(listing)
    except RemapParseError:
        pass
