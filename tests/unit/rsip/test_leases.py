"""The lease engine: blocks, listens, whole addresses, expiry, quarantine, PCP claims,
persistence round trip."""

from __future__ import annotations

import ipaddress
import itertools
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.rsip.leases import BindKind, LeaseError, LeasePolicy, Leases, Refusal
from ipshift.rsip.store import LeaseStore, StoreError

A = ipaddress.IPv4Address("203.0.113.1")
B = ipaddress.IPv4Address("203.0.113.2")


def leases(**kw: object) -> Leases:
    values: dict[str, object] = {"pool": (A,), "port_range": (10000, 10999), "block": 100,
                                 "quarantine": 120.0}
    values.update(kw)
    return Leases(LeasePolicy(**values))  # type: ignore[arg-type]


def test_blocks_are_disjoint_and_fill_the_range() -> None:
    ls = leases(max_clients=20)
    binds = []
    for n in range(10):
        client = ls.register(f"192.0.2.{n + 10}", "tcp", 0.0)
        binds.append(ls.assign_ports(client.client_id, None, None, 100, None, 0.0))
    spans = sorted((b.first, b.last) for b in binds)
    assert spans[0] == (10000, 10099) and spans[-1] == (10900, 10999)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    late = ls.register("192.0.2.99", "tcp", 0.0)
    with pytest.raises(LeaseError) as err:
        ls.assign_ports(late.client_id, None, None, 100, None, 0.0)
    assert err.value.refusal is Refusal.LOCAL_ADDRPORT_UNAVAILABLE


def test_register_twice_and_client_limit() -> None:
    ls = leases(max_clients=0)  # five per public address
    first = ls.register("192.0.2.10", "udp", 0.0)
    with pytest.raises(LeaseError) as err:
        ls.register("192.0.2.10", "udp", 0.0)
    assert err.value.refusal is Refusal.ALREADY_REGISTERED
    assert err.value.client_id == first.client_id
    for n in range(4):
        ls.register(f"192.0.2.{20 + n}", "tcp", 0.0)
    with pytest.raises(LeaseError) as err:
        ls.register("192.0.2.30", "tcp", 0.0)
    assert err.value.refusal is Refusal.REGISTRATION_DENIED


def test_client_id_must_be_the_senders() -> None:
    ls = leases()
    one = ls.register("192.0.2.10", "tcp", 0.0)
    two = ls.register("192.0.2.11", "tcp", 0.0)
    assert ls.client(one.client_id, "192.0.2.10") is one
    with pytest.raises(LeaseError) as err:
        ls.client(two.client_id, "192.0.2.10")
    assert err.value.refusal is Refusal.BAD_CLIENT_ID
    with pytest.raises(LeaseError) as err:
        ls.client(1, "192.0.2.99")
    assert err.value.refusal is Refusal.REGISTER_FIRST


def test_listen_conflicts_and_ranges() -> None:
    ls = leases()
    one = ls.register("192.0.2.10", "tcp", 0.0)
    two = ls.register("192.0.2.11", "tcp", 0.0)
    bind = ls.assign_ports(one.client_id, A, [80], 1, None, 0.0, listen=True)
    assert (bind.first, bind.last, bind.kind) == (80, 80, BindKind.LISTEN)
    with pytest.raises(LeaseError) as err:
        ls.assign_ports(two.client_id, A, [80], 1, None, 0.0, listen=True)
    assert err.value.refusal is Refusal.LOCAL_ADDRPORT_INUSE
    with pytest.raises(LeaseError) as err:   # outside LISTEN_RANGE and PORT_RANGE
        ls.assign_ports(two.client_id, A, [5000], 1, None, 0.0, listen=True)
    assert err.value.refusal is Refusal.LOCAL_ADDRPORT_UNALLOWED
    with pytest.raises(LeaseError) as err:   # RSAP-IP may not take well-known ports
        ls.assign_ports(two.client_id, A, [81], 1, None, 0.0)
    assert err.value.refusal is Refusal.LOCAL_ADDRPORT_UNALLOWED
    with pytest.raises(LeaseError) as err:
        ls.assign_ports(two.client_id, ipaddress.IPv4Address("198.51.100.1"), [81], 1, None,
                        0.0, listen=True)
    assert err.value.refusal is Refusal.LOCAL_ADDRPORT_UNALLOWED


def test_freed_ports_rest_in_quarantine() -> None:
    ls = leases(port_range=(10000, 10099))
    one = ls.register("192.0.2.10", "tcp", 0.0)
    two = ls.register("192.0.2.11", "tcp", 0.0)
    bind = ls.assign_ports(one.client_id, None, None, 100, None, 0.0)
    ls.free(one.client_id, bind.bind_id, 1.0)
    with pytest.raises(LeaseError):
        ls.assign_ports(two.client_id, None, None, 100, None, 60.0)
    ls.expire(121.0)
    again = ls.assign_ports(two.client_id, None, None, 100, None, 121.0)
    assert (again.first, again.last) == (10000, 10099)


def test_expiry_frees_binds_then_the_registration() -> None:
    ls = leases(bind_lease=100.0, register_lease=50.0)
    client = ls.register("192.0.2.10", "tcp", 0.0)
    bind = ls.assign_ports(client.client_id, None, None, 10, None, 0.0)
    assert client.expires == 100.0   # R = max(R, B)
    ls.extend(client.client_id, bind.bind_id, 200.0, 50.0)
    assert client.expires == 250.0
    assert ls.expire(249.0) == []
    gone = ls.expire(250.0)
    assert [(g.bind_id is None) for g in gone] == [False, True]
    assert not ls.clients
    assert ls.next_expiry() == 370.0  # the quarantine of the freed block


def test_whole_address_excludes_ports_and_own_address() -> None:
    ls = leases(pool=(A, B), own=(A,))
    one = ls.register("192.0.2.10", "tcp", 0.0)
    two = ls.register("192.0.2.11", "tcp", 0.0)
    whole = ls.assign_address(one.client_id, None, None, 0.0)
    assert whole.address == B and whole.kind is BindKind.ADDRESS
    with pytest.raises(LeaseError) as err:
        ls.assign_address(two.client_id, A, None, 0.0)
    assert err.value.refusal is Refusal.LOCAL_ADDR_UNALLOWED
    with pytest.raises(LeaseError) as err:
        ls.assign_address(two.client_id, B, None, 0.0)
    assert err.value.refusal is Refusal.LOCAL_ADDR_INUSE
    block = ls.assign_ports(two.client_id, None, None, 10, None, 0.0)
    assert block.address == A     # B is taken whole


def test_pcp_claims_share_the_port_space() -> None:
    ls = leases(port_range=(10000, 10009))
    client = ls.register("192.0.2.10", "tcp", 0.0)
    ls.assign_ports(client.client_id, None, None, 5, None, 0.0)   # 10000-10004
    assert ls.claim("pcp:192.0.2.20", A, socket.IPPROTO_TCP, 10002, 60.0, 0.0) == 10005
    assert ls.claim("pcp:192.0.2.20", A, socket.IPPROTO_TCP, 8080, 60.0, 0.0) == 8080
    for _ in range(4):
        assert ls.claim("pcp:x", A, socket.IPPROTO_UDP, None, 60.0, 0.0) is not None
    assert ls.claim("pcp:x", A, socket.IPPROTO_UDP, None, 60.0, 0.0) is None
    ls.release("pcp:192.0.2.20", A, socket.IPPROTO_TCP, 8080, 1.0)
    assert ls.claim("pcp:other", A, socket.IPPROTO_TCP, 8080, 60.0, 2.0) != 8080  # quarantine


def test_pcp_claims_of_privileged_ports_only_in_listen_range() -> None:
    ls = leases(port_range=(10000, 10009), listen_range=(80, 80))
    assert ls.claim("pcp:192.0.2.20", A, socket.IPPROTO_TCP, 80, 60.0, 0.0) == 80
    # the gateway's own ssh port: another port comes back
    assert ls.claim("pcp:192.0.2.20", A, socket.IPPROTO_TCP, 22, 60.0, 0.0) == 10000
    # owners are told apart exactly: a second owner cannot release the first one's port
    ls.release("pcp:192.0.2.21", A, socket.IPPROTO_TCP, 80, 1.0)
    assert ls.claim("pcp:192.0.2.21", A, socket.IPPROTO_TCP, 80, 60.0, 2.0) != 80


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reg", "assign", "listen", "free", "extend",
                                            "expire", "dereg"]),
                          st.integers(0, 7), st.integers(1, 300)), max_size=60))
def test_random_operations_never_overlap(ops: list[tuple[str, int, int]]) -> None:
    ls = leases(port_range=(10000, 10999), max_clients=8, quarantine=5.0)
    now = 0.0
    for op, who, amount in ops:
        now += 1.0
        host = f"192.0.2.{who + 10}"
        client = ls.client_of(host)
        try:
            if op == "reg":
                ls.register(host, "tcp", now)
            elif client is None:
                continue
            elif op == "assign":
                ls.assign_ports(client.client_id, None, None, amount, None, now)
            elif op == "listen":
                ls.assign_ports(client.client_id, A, [amount], 1, 30.0, now, listen=True)
            elif op == "free" and client.binds:
                ls.free(client.client_id, next(iter(client.binds)), now)
            elif op == "extend" and client.binds:
                ls.extend(client.client_id, next(iter(client.binds)), amount, now)
            elif op == "expire":
                now += amount * 3
                ls.expire(now)
            elif op == "dereg":
                ls.deregister(client.client_id, now)
        except LeaseError:
            pass
        spans = sorted((b.first, b.last) for b in ls.binds())
        assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
        for c in ls.clients.values():
            assert all(c.expires >= b.expires for b in c.binds.values())


def test_store_round_trip(tmp_path: Path) -> None:
    ls = leases()
    one = ls.register("192.0.2.10", "udp", 100.0)
    one.tunnel_port = 4556
    bind = ls.assign_ports(one.client_id, None, None, 100, None, 100.0, tunnel=2)
    ls.assign_ports(one.client_id, A, [22], 1, None, 100.0, listen=True)
    store = LeaseStore(tmp_path / "state" / "rsip.db")
    changed, removed = ls.take_changes()
    store.save([ls.clients[c] for c in changed], removed, now=100.0, wall=5000.0)
    store.close()
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "state" / "rsip.db").stat().st_mode & 0o777 == 0o600
    again = LeaseStore(tmp_path / "state" / "rsip.db")
    # restarted 30 s later on a clock that starts at 7
    clients = again.load(now=7.0, wall=5030.0)
    fresh = leases()
    fresh.restore(clients, 7.0)
    got = fresh.clients[one.client_id]
    assert got.tunnel_port == 4556 and got.transport == "udp"
    assert {(b.first, b.last, b.tunnel) for b in got.binds.values()} == {
        (bind.first, bind.last, 2), (22, 22, 1)}
    assert got.binds[bind.bind_id].expires == pytest.approx(bind.expires - 100.0 - 30.0 + 7.0)
    # the next client does not reuse the restored ID, nor the restored ports
    other = fresh.register("192.0.2.11", "tcp", 8.0)
    assert other.client_id != one.client_id
    taken = fresh.assign_ports(other.client_id, None, None, 100, None, 8.0)
    assert taken.first != bind.first


def test_store_refuses_a_damaged_file(tmp_path: Path) -> None:
    path = tmp_path / "rsip.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match="move the file aside"):
        LeaseStore(path).load(0.0, 0.0)


def test_an_unused_claim_goes_back_without_quarantine() -> None:
    ls = leases(port_range=(10000, 10002))
    client = ls.register("192.0.2.10", "tcp", 0.0)
    ls.assign_ports(client.client_id, None, None, 1, None, 0.0)   # 10000 is the host's
    offered = ls.claim("pcp:192.0.2.20", A, socket.IPPROTO_TCP, 10000, 60.0, 0.0)
    assert offered == 10001  # not the port asked for: the responder gives it back
    ls.unclaim("pcp:192.0.2.20", A, socket.IPPROTO_TCP, 10001)
    assert ls.claim("pcp:192.0.2.21", A, socket.IPPROTO_TCP, 10001, 60.0, 0.1) == 10001
    ls.unclaim("pcp:192.0.2.99", A, socket.IPPROTO_TCP, 10001)  # not its claim: nothing
    assert ls.claim("pcp:192.0.2.22", A, socket.IPPROTO_TCP, 10001, 60.0, 0.2) != 10001
