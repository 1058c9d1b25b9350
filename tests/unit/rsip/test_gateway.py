"""The gateway engine: every request type, its errors, UDP at-most-once, expiry messages,
and what the data plane is told."""

from __future__ import annotations

import ipaddress
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.rsip import wire
from ipshift.rsip.gateway import (
    UDP_TUNNEL,
    ClientRoutes,
    GatewayEngine,
    GatewaySettings,
    Origin,
    Persist,
    Send,
)
from ipshift.rsip.leases import LeasePolicy, Leases
from ipshift.rsip.wire import (
    Address,
    BindId,
    ClientId,
    ErrorCode,
    Indicator,
    LeaseTime,
    Message,
    MessageCounter,
    MessageType,
    Ports,
    Tunnel,
    TunnelType,
)

PUBLIC = ipaddress.IPv4Address("203.0.113.1")
SECOND = ipaddress.IPv4Address("203.0.113.2")
A = Origin("tcp", "192.0.2.10", 40000, 1)
B = Origin("tcp", "192.0.2.11", 40001, 2)
A_UDP = Origin("udp", "192.0.2.10", 4555)


def engine(**policy: Any) -> GatewayEngine:
    values: dict[str, Any] = {"pool": (PUBLIC, SECOND), "own": (PUBLIC,),
                              "port_range": (10000, 19999), "block": 255}
    values.update(policy)
    return GatewayEngine(Leases(LeasePolicy(**values)), GatewaySettings(
        tunnel_port=4556, local_networks=(ipaddress.IPv4Network("192.0.2.0/24"),)))


def ask(gw: GatewayEngine, origin: Origin, message: Message, now: float = 0.0) -> Message:
    """Send `message` (through the codec, as the daemon does) and return the one answer."""
    gw.receive(wire.encode(message), origin, now)
    sends = [a for a in gw.actions() if isinstance(a, Send)]
    assert len(sends) == 1
    answer = wire.decode(wire.encode(sends[0].message))  # what goes on the wire is valid
    return answer


def register(gw: GatewayEngine, origin: Origin = A, *params: Any) -> int:
    answer = ask(gw, origin, Message(MessageType.REGISTER_REQUEST, tuple(params)))
    assert answer.type is MessageType.REGISTER_RESPONSE
    client_id = answer.require(ClientId).value
    return client_id


def rsap(client_id: int, ports: Ports | None = None, *extra: Any) -> Message:
    return Message(MessageType.ASSIGN_REQUEST_RSAP_IP, (
        ClientId(client_id), Address.dont_care(), ports or Ports.any(255),
        Address.dont_care(), Ports.any(1), *extra))


def error_of(answer: Message) -> ErrorCode:
    assert answer.type is MessageType.ERROR_RESPONSE, answer
    return ErrorCode(answer.require(wire.Error).code)


def test_register_assign_extend_free_deregister() -> None:
    gw = engine()
    client_id = register(gw)
    answer = ask(gw, A, rsap(client_id))
    assert answer.type is MessageType.ASSIGN_RESPONSE_RSAP_IP
    addresses, ports = answer.all(Address), answer.all(Ports)
    assert addresses[0].value == PUBLIC and addresses[1].value is None
    assert ports[0].number == 255 and ports[0].ports == (10000,)
    assert answer.require(Tunnel).kind == TunnelType.IP_IP
    bind_id = answer.require(BindId).value
    answer = ask(gw, A, Message(MessageType.EXTEND_REQUEST, (
        ClientId(client_id), BindId(bind_id), LeaseTime(900))), now=10.0)
    assert answer.type is MessageType.EXTEND_RESPONSE and answer.require(LeaseTime).seconds == 900
    answer = ask(gw, A, Message(MessageType.FREE_REQUEST, (ClientId(client_id),
                                                           BindId(bind_id))))
    assert answer.type is MessageType.FREE_RESPONSE
    assert error_of(ask(gw, A, Message(MessageType.FREE_REQUEST, (
        ClientId(client_id), BindId(bind_id))))) is ErrorCode.BAD_BIND_ID
    answer = ask(gw, A, Message(MessageType.DE_REGISTER_REQUEST, (ClientId(client_id),)))
    assert answer.type is MessageType.DE_REGISTER_RESPONSE
    assert error_of(ask(gw, A, rsap(client_id))) is ErrorCode.REGISTER_FIRST


def test_data_plane_follows_the_binds() -> None:
    gw = engine()
    client_id = register(gw, A, wire.udp_tunnel_param(40100))
    gw.receive(wire.encode(rsap(client_id)), A, 0.0)
    actions = gw.actions()
    routes = [a for a in actions if isinstance(a, ClientRoutes)]
    persisted = [a for a in actions if isinstance(a, Persist)]
    assert len(routes) == 1 and len(persisted) == 1
    route = routes[0].routes[0]
    assert route.host == "192.0.2.10" and route.tunnel == UDP_TUNNEL
    assert route.tunnel_port == 40100
    assert [(lease.address, lease.first, lease.last) for lease in route.leases] == [
        (PUBLIC, 10000, 10254)]
    sent = next(a for a in actions if isinstance(a, Send)).message
    assert wire.udp_tunnel_port(sent) == 4556


def test_second_host_gets_another_block_and_conflicting_listen_is_refused() -> None:
    gw = engine()
    one, two = register(gw, A), register(gw, B)
    first = ask(gw, A, rsap(one)).all(Ports)[0].ports[0]
    second = ask(gw, B, rsap(two)).all(Ports)[0].ports[0]
    assert abs(first - second) >= 255
    listen = Message(MessageType.LISTEN_REQUEST, (
        ClientId(one), Address.of(PUBLIC), Ports.single(80), Address.dont_care(),
        Ports.any(1)))
    answer = ask(gw, A, listen)
    assert answer.type is MessageType.LISTEN_RESPONSE
    assert answer.all(Ports)[0].ports == (80,)
    again = Message(MessageType.LISTEN_REQUEST, (
        ClientId(two), Address.of(PUBLIC), Ports.single(80), Address.dont_care(),
        Ports.any(1)))
    assert error_of(ask(gw, B, again)) is ErrorCode.LOCAL_ADDRPORT_INUSE


def test_a_host_cannot_act_for_another() -> None:
    gw = engine()
    one, two = register(gw, A), register(gw, B)
    bind_id = ask(gw, A, rsap(one)).require(BindId).value
    answer = ask(gw, B, Message(MessageType.FREE_REQUEST, (ClientId(one), BindId(bind_id))))
    assert error_of(answer) is ErrorCode.BAD_CLIENT_ID
    assert answer.client_id == two
    assert error_of(ask(gw, A, Message(MessageType.REGISTER_REQUEST, ()))) is \
        ErrorCode.ALREADY_REGISTERED


def test_rsa_ip_and_tunnel_types() -> None:
    gw = engine()
    client_id = register(gw)
    answer = ask(gw, A, Message(MessageType.ASSIGN_REQUEST_RSA_IP, (
        ClientId(client_id), Address.dont_care(), Address.dont_care(), Ports.any(1),
        Tunnel(TunnelType.GRE))))
    assert answer.type is MessageType.ASSIGN_RESPONSE_RSA_IP
    assert answer.all(Address)[0].value == SECOND
    assert answer.require(Tunnel).kind == TunnelType.GRE
    l2tp = rsap(client_id, None, Tunnel(TunnelType.L2TP))
    assert error_of(ask(gw, A, l2tp)) is ErrorCode.BAD_TUNNEL_TYPE


def test_query_answers_local_and_remote() -> None:
    gw = engine()
    client_id = register(gw)
    answer = ask(gw, A, Message(MessageType.QUERY_REQUEST, (
        ClientId(client_id), Indicator(1), Address.of(ipaddress.IPv4Address("192.0.2.99")),
        Indicator(1), Address.of(ipaddress.IPv4Address("198.51.100.7")))))
    assert answer.type is MessageType.QUERY_RESPONSE
    assert [i.value for i in answer.all(Indicator)] == [1, 3]


def test_udp_requests_run_at_most_once() -> None:
    gw = engine()
    request = Message(MessageType.REGISTER_REQUEST, (MessageCounter(7),))
    first = ask(gw, A_UDP, request)
    again = ask(gw, A_UDP, request, now=1.0)
    assert first == again and first.counter == 7
    client_id = first.require(ClientId).value
    assign = rsap(client_id, None, MessageCounter(8))
    block = ask(gw, A_UDP, assign).all(Ports)[0].ports
    assert ask(gw, A_UDP, assign).all(Ports)[0].ports == block  # not a second block
    assert len(gw.leases.clients[client_id].binds) == 1
    assert gw.counters.replayed == 2
    no_counter = rsap(client_id)
    assert error_of(ask(gw, A_UDP, no_counter)) is ErrorCode.MESSAGE_COUNTER_REQUIRED


def test_expiry_sends_free_then_deregister() -> None:
    gw = engine(bind_lease=60.0, register_lease=60.0)
    client_id = register(gw)
    ask(gw, A, rsap(client_id))
    timer = gw.next_timer()
    assert timer == 60.0
    gw.handle_timer(60.0)
    sent = [a.message for a in gw.actions() if isinstance(a, Send)]
    assert [m.type for m in sent] == [MessageType.FREE_RESPONSE,
                                      MessageType.DE_REGISTER_RESPONSE]
    assert all(m.counter == 0 for m in sent)


def test_host_messages_the_gateway_does_not_take() -> None:
    gw = engine()
    answer = ask(gw, A, Message(MessageType.REGISTER_RESPONSE, (
        ClientId(1), LeaseTime(5), wire.FlowPolicy(1, 3))))
    assert error_of(answer) in (ErrorCode.ILLEGAL_MESSAGE, ErrorCode.UNSUPPORTED_MESSAGE)
    client_id = register(gw)
    rsipsec = Message(MessageType.ASSIGN_REQUEST_RSIPSEC, (
        ClientId(client_id), Address.dont_care(), Ports.any(1), Address.dont_care(),
        Ports.any(1), wire.Spi(1, ())))
    try:
        data = wire.encode(rsipsec)
    except wire.RsipWireError:
        return  # the codec's grammar for this message differs; nothing to ask
    gw.receive(data, A, 0.0)
    sent = [a.message for a in gw.actions() if isinstance(a, Send)]
    assert error_of(sent[0]) in (ErrorCode.IPSEC_UNALLOWED, ErrorCode.MISSING_PARAM,
                                 ErrorCode.BAD_MESSAGE, ErrorCode.EXTRA_PARAM)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_is_answered_with_an_error_never_a_crash(data: bytes) -> None:
    gw = engine()
    register(gw)
    gw.receive(data, A, 0.0)
    for action in gw.actions():
        if isinstance(action, Send):
            wire.encode(action.message)
