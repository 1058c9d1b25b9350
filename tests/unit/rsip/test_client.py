"""The RSIP client engine with a fake clock: registration over TCP and UDP (counters,
retransmission with backoff, giving up), leases and their extension, LISTEN (asked for, auto,
refused, freed), failure recovery (RFC 3103 section 10.2), the seed's error lines, the stop
sequence, every ignored message counted; then the engine against the real gateway engine,
in memory; and the command line's parsing and status rendering."""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.rsip import wire
from ipshift.rsip.client import (
    ASSIGN_FAILED,
    CONNECT_FAILED,
    MTU_PROBLEM,
    REGISTER_FAILED,
    BindAdded,
    BindRemoved,
    ClientEngine,
    ClientSettings,
    Connect,
    Disconnect,
    Failed,
    ListenRefused,
    Phase,
    Send,
    Stopped,
    TunnelDown,
    TunnelKind,
    TunnelUp,
    mtu_problem,
)
from ipshift.rsip.wire import (
    Address,
    BindId,
    ClientId,
    ErrorCode,
    FlowPolicy,
    LeaseTime,
    Message,
    MessageCounter,
    MessageType,
    Ports,
    Tunnel,
    TunnelType,
)

SERVER = ipaddress.IPv4Address("192.0.2.1")
PUBLIC = ipaddress.IPv4Address("203.0.113.1")
FIRST = 8192
LEASE = 600
GW_TUNNEL_PORT = 4556


# --- a scripted gateway --------------------------------------------------------------------------
class Script:
    """The engine and what it sent, with answers made the way a gateway makes them."""

    def __init__(self, **settings: Any) -> None:
        self.engine = ClientEngine(ClientSettings(**settings), SERVER)
        self.now = 0.0
        self.log: list[Any] = []
        self.outbox: list[Message] = []

    @property
    def udp(self) -> bool:
        return self.engine.settings.transport == "udp"

    def take(self) -> list[Any]:
        """The actions since the last look; what was sent also stays for `sent`."""
        actions = self.engine.actions()
        self.log += actions
        self.outbox += [a.message for a in actions if isinstance(a, Send)]
        return actions

    def sent(self) -> list[Message]:
        self.take()
        messages, self.outbox = self.outbox, []
        return messages

    def one(self) -> Message:
        """The one request just sent (decoded from its bytes: what goes out is valid)."""
        messages = self.sent()
        assert len(messages) == 1, messages
        return wire.decode(wire.encode(messages[0]))

    def reply(self, request: Message, kind: MessageType, *params: Any) -> list[Any]:
        """Answer `request` (echoing its counter over UDP) through the codec."""
        if request.counter is not None:
            params = (*params, MessageCounter(request.counter))
        self.engine.receive(wire.encode(Message(kind, tuple(params))), self.now)
        return self.take()

    def error(self, request: Message, code: ErrorCode, client_id: int | None = None) -> list[Any]:
        counter = request.counter
        self.engine.receive(wire.encode(wire.error_response(code, client_id=client_id,
                                                            counter=counter)), self.now)
        return self.take()

    def push(self, kind: MessageType, *params: Any) -> list[Any]:
        """An asynchronous message (counter 0 over UDP)."""
        if self.udp:
            params = (*params, MessageCounter(0))
        self.engine.receive(wire.encode(Message(kind, tuple(params))), self.now)
        return self.take()

    def at(self, when: float) -> list[Any]:
        self.now = when
        self.engine.handle_timer(when)
        return self.take()

    # the usual answers
    def start(self) -> Message:
        self.engine.start(self.now)
        assert any(isinstance(a, Connect) for a in self.take())
        self.engine.connected(self.now)
        request = self.one()
        assert request.type is MessageType.REGISTER_REQUEST
        return request

    def register(self, request: Message, client_id: int = 1, *extra: Any) -> list[Any]:
        params: list[Any] = [ClientId(client_id), LeaseTime(LEASE),
                             FlowPolicy(wire.FlowPolicyKind.MACRO,
                                        wire.FlowPolicyKind.NO_POLICY),
                             Tunnel(TunnelType.IP_IP), Tunnel(TunnelType.GRE)]
        if wire.udp_tunnel_port(request):
            params.append(wire.udp_tunnel_param(GW_TUNNEL_PORT))
        return self.reply(request, MessageType.REGISTER_RESPONSE, *params, *extra)

    def assign(self, request: Message, client_id: int = 1, bind_id: int = 1,
               first: int = FIRST, count: int = 255, lease: int = LEASE,
               udp: bool | None = None) -> list[Any]:
        assert request.type is MessageType.ASSIGN_REQUEST_RSAP_IP
        params: list[Any] = [ClientId(client_id), BindId(bind_id), Address.of(PUBLIC),
                             Ports.block(first, count), Address.dont_care(), Ports.any(1),
                             LeaseTime(lease), Tunnel(TunnelType.IP_IP)]
        if udp if udp is not None else wire.udp_tunnel_port(request):
            params.append(wire.udp_tunnel_param(GW_TUNNEL_PORT))
        return self.reply(request, MessageType.ASSIGN_RESPONSE_RSAP_IP, *params)

    def grant_listen(self, request: Message, bind_id: int, client_id: int = 1) -> list[Any]:
        assert request.type is MessageType.LISTEN_REQUEST
        port = request.all(Ports)[0].expand()[0]
        return self.reply(request, MessageType.LISTEN_RESPONSE, ClientId(client_id),
                          BindId(bind_id), Address.of(PUBLIC), Ports.single(port),
                          Address.dont_care(), Ports.any(1), Tunnel(TunnelType.IP_IP),
                          LeaseTime(LEASE))

    def up(self) -> TunnelUp:
        """Register and lease the block: the tunnel's values."""
        self.register(self.start())
        actions = self.assign(self.one())
        ups = [a for a in actions if isinstance(a, TunnelUp)]
        assert len(ups) == 1 and self.engine.phase is Phase.ASSIGNED
        return ups[0]


def of(actions: list[Any], kind: type) -> list[Any]:
    return [a for a in actions if isinstance(a, kind)]


def failure(actions: list[Any]) -> Failed:
    failed = of(actions, Failed)
    assert len(failed) == 1, actions
    return failed[0]


# --- the normal life --------------------------------------------------------------------------
def test_tcp_register_assign_brings_the_tunnel_up() -> None:
    s = Script()
    request = s.start()
    assert request.counter is None  # TCP: no counters
    assert wire.udp_tunnel_port(request) == 4556  # asks for ipshift's UDP framing
    s.register(request, client_id=7)
    assign = s.one()
    assert assign.client_id == 7
    addresses, ports = assign.all(Address), assign.all(Ports)
    assert addresses[0].value is None and addresses[1].value is None
    assert ports[0].number == 255 and not ports[0].ports
    assert assign.require(Tunnel).kind == TunnelType.IP_IP
    assert wire.udp_tunnel_port(assign) == 4556
    actions = s.assign(assign, client_id=7)
    (up,) = of(actions, TunnelUp)
    assert up == TunnelUp(PUBLIC, FIRST, FIRST + 254, SERVER, TunnelKind.UDP, GW_TUNNEL_PORT)
    (added,) = of(actions, BindAdded)
    assert (added.bind.bind_id, added.bind.kind, added.bind.count) == (1, "ports", 255)
    status = s.engine.status(s.now)
    assert status["state"] == "assigned" and status["client_id"] == 7
    assert status["binds"][0]["ports"] == "8192-8446" and status["registration_s"] == LEASE


def test_ipip_and_gre_are_asked_for_without_the_udp_parameter() -> None:
    for kind, wanted in ((TunnelKind.IPIP, TunnelType.IP_IP), (TunnelKind.GRE, TunnelType.GRE)):
        s = Script(tunnel=kind)
        request = s.start()
        assert wire.udp_tunnel_port(request) is None
        s.register(request)
        assign = s.one()
        assert assign.require(Tunnel).kind == wanted and wire.udp_tunnel_port(assign) is None
        answer = [ClientId(1), BindId(1), Address.of(PUBLIC), Ports.block(FIRST, 255),
                  Address.dont_care(), Ports.any(1), LeaseTime(LEASE), Tunnel(wanted)]
        (up,) = of(s.reply(assign, MessageType.ASSIGN_RESPONSE_RSAP_IP, *answer), TunnelUp)
        assert up.kind is kind and up.udp_port == 0


def test_a_gateway_without_the_udp_tunnel_gets_ipip() -> None:
    s = Script()
    request = s.start()
    actions = s.reply(request, MessageType.REGISTER_RESPONSE, ClientId(1), LeaseTime(LEASE),
                      FlowPolicy(wire.FlowPolicyKind.MACRO, wire.FlowPolicyKind.NO_POLICY))
    assert any("does not offer the UDP tunnel" in getattr(a, "text", "") for a in actions)
    assign = s.one()
    assert wire.udp_tunnel_port(assign) is None
    (up,) = of(s.assign(assign, udp=False), TunnelUp)
    assert up.kind is TunnelKind.IPIP


def test_a_tunnel_endpoint_named_by_the_gateway_is_used() -> None:
    s = Script()
    s.register(s.start())
    assign = s.one()
    endpoint = ipaddress.IPv4Address("192.0.2.2")
    actions = s.reply(assign, MessageType.ASSIGN_RESPONSE_RSAP_IP, ClientId(1), BindId(1),
                      Address.of(PUBLIC), Ports.block(FIRST, 255), Address.dont_care(),
                      Ports.any(1), LeaseTime(LEASE), Tunnel(TunnelType.IP_IP),
                      Address.of(endpoint))
    assert of(actions, TunnelUp)[0].endpoint == endpoint


def test_extension_at_two_thirds_of_the_lease() -> None:
    s = Script()
    s.up()
    assert s.engine.next_timer() == pytest.approx(LEASE * 2 / 3)
    assert s.at(LEASE * 2 / 3 - 1) == []
    s.at(LEASE * 2 / 3)
    extend = s.one()
    assert extend.type is MessageType.EXTEND_REQUEST and extend.bind_id == 1
    s.reply(extend, MessageType.EXTEND_RESPONSE, ClientId(1), BindId(1), LeaseTime(300))
    assert s.engine.next_timer() == pytest.approx(400 + 200)
    assert s.engine.status(s.now)["binds"][0]["lease_s"] == 300


def test_asked_lease_goes_into_the_requests() -> None:
    s = Script(lease=120)
    s.register(s.start())
    assert s.one().require(LeaseTime).seconds == 120


# --- UDP: counters, retransmission, giving up -------------------------------------------------
def test_udp_retransmits_with_backoff_then_gives_up() -> None:
    s = Script(transport="udp")
    request = s.start()
    assert request.counter == 1
    deadlines = []
    for _ in range(6):
        deadline = s.engine.next_timer()
        assert deadline is not None
        deadlines.append(deadline)
        again = [m for m in (a.message for a in s.at(deadline) if isinstance(a, Send))]
        assert len(again) == 1 and again[0] == request  # the same message, the same counter
    intervals = [b - a for a, b in zip([0.0, *deadlines], deadlines, strict=False)]
    assert intervals == pytest.approx([0.0125, 0.025, 0.05, 0.1, 0.2, 0.4])
    assert s.engine.counters.retransmissions == 6
    last = s.engine.next_timer()
    assert last == pytest.approx(deadlines[-1] + 0.8)
    failed = failure(s.at(last))
    assert failed.line == f"{CONNECT_FAILED}: no answer after 7 attempts"
    assert s.engine.phase is Phase.FAILED and s.engine.counters.gave_up == 1


def test_udp_counter_moves_on_only_with_an_answer_and_stale_ones_are_ignored() -> None:
    s = Script(transport="udp")
    request = s.start()
    s.at(0.0125)  # a retransmission: same counter
    assert s.sent() == [request]
    s.register(request)
    assign = s.one()
    assert assign.counter == 2
    # the answer to the retransmitted REGISTER arrives late: stale
    s.reply(request, MessageType.REGISTER_RESPONSE, ClientId(1), LeaseTime(LEASE),
            FlowPolicy(wire.FlowPolicyKind.MACRO, wire.FlowPolicyKind.NO_POLICY))
    assert s.engine.counters.ignored["stale_counter"] == 1
    s.assign(assign)
    assert s.engine.phase is Phase.ASSIGNED


def test_udp_counter_wraps_to_one() -> None:
    s = Script(transport="udp")
    s.engine._counter = 0xFFFFFFFF
    request = s.start()
    assert request.counter == 0xFFFFFFFF
    s.register(request)
    assert s.one().counter == 1


def test_udp_extension_that_gets_no_answer_is_tried_again_until_the_bind_expires() -> None:
    s = Script(transport="udp")
    s.up()
    s.at(400)
    extend = s.one()
    for _ in range(7):
        s.at(s.engine.next_timer() or 0)
    assert s.sent() == [extend] * 6
    assert s.engine.counters.gave_up == 1 and s.engine.phase is Phase.ASSIGNED
    retry = s.engine.next_timer()
    assert retry is not None and 400 < retry < LEASE  # halfway to the expiry
    s.at(retry)
    again = s.one()
    # unanswered, the counter stays (RFC 3103 section 10.1): the same request again
    assert again.type is MessageType.EXTEND_REQUEST and again.counter == extend.counter
    # the gateway stays silent: the bind runs out, the tunnel goes down, the block is asked
    # for again (and, unanswered, the client waits and tries again)
    actions: list[Any] = []
    for _ in range(1000):
        when = s.engine.next_timer()
        if when is None or when > LEASE + 1:
            break
        actions += s.at(when)
    assert of(actions, TunnelDown) and of(actions, BindRemoved)
    assert not of(actions, Failed)  # it was up once: no giving up for good


# --- failure recovery (RFC 3103 section 10.2) ----------------------------------------------------
def test_register_first_means_the_gateway_forgot_us() -> None:
    s = Script()
    s.up()
    s.at(400)
    extend = s.one()
    actions = s.error(extend, ErrorCode.REGISTER_FIRST)
    assert of(actions, TunnelDown) and of(actions, BindRemoved)
    forget = s.one()
    assert forget.type is MessageType.DE_REGISTER_REQUEST and forget.client_id == 1
    s.error(forget, ErrorCode.REGISTER_FIRST)  # to be ignored (section 10.2.2)
    again = s.one()
    assert again.type is MessageType.REGISTER_REQUEST
    s.register(again, client_id=2)
    (up,) = of(s.assign(s.one(), client_id=2, bind_id=1, first=9000), TunnelUp)
    assert (up.first, s.engine.client_id) == (9000, 2)
    assert s.engine.counters.recoveries == 1


def test_already_registered_after_a_restart_deregisters_the_old_id_first() -> None:
    s = Script()
    request = s.start()
    s.error(request, ErrorCode.ALREADY_REGISTERED, client_id=5)
    forget = s.one()
    assert forget.type is MessageType.DE_REGISTER_REQUEST and forget.client_id == 5
    s.reply(forget, MessageType.DE_REGISTER_RESPONSE, ClientId(5))
    s.register(s.one(), client_id=6)
    assert of(s.assign(s.one(), client_id=6), TunnelUp)


def test_already_registered_again_and_again_gives_up() -> None:
    s = Script()
    request = s.start()
    for _ in range(3):
        s.error(request, ErrorCode.ALREADY_REGISTERED, client_id=5)
        forget = s.one()
        s.reply(forget, MessageType.DE_REGISTER_RESPONSE, ClientId(5))
        request = s.one()
    failed = failure(s.error(request, ErrorCode.ALREADY_REGISTERED, client_id=5))
    assert failed.line == REGISTER_FAILED


def test_a_broken_connection_resumes_the_registration() -> None:
    s = Script(listens=(80,))
    s.up()
    s.grant_listen(s.one(), bind_id=2)
    s.engine.connection_lost("Connection reset by peer", s.now)
    actions = s.take()
    assert of(actions, Connect)  # at once, the first time
    assert not of(actions, TunnelDown) and s.engine.phase is Phase.CONNECTING
    s.engine.connected(s.now)
    request = s.one()
    assert request.type is MessageType.REGISTER_REQUEST
    s.error(request, ErrorCode.ALREADY_REGISTERED, client_id=1)
    extends = []
    for _ in range(2):
        extend = s.one()
        assert extend.type is MessageType.EXTEND_REQUEST
        extends.append(extend.bind_id)
        s.reply(extend, MessageType.EXTEND_RESPONSE, ClientId(1), BindId(extend.bind_id),
                LeaseTime(LEASE))
    assert sorted(extends) == [1, 2] and s.engine.phase is Phase.ASSIGNED
    assert not any(isinstance(a, TunnelDown) for a in s.log)


def test_reconnection_backs_off() -> None:
    s = Script()
    s.up()
    s.engine.connection_lost("Connection refused", s.now)
    assert of(s.take(), Connect)  # the first attempt at once
    delays = []
    for _ in range(4):
        s.engine.connection_lost("Connection refused", s.now)
        assert s.engine.phase is Phase.WAITING and not of(s.take(), Connect)
        when = s.engine.next_timer()
        # the extension timer is further away than any of these
        assert when is not None and when < LEASE * 2 / 3
        delays.append(when - s.now)
        assert of(s.at(when), Connect)
    assert delays == [1.0, 2.0, 4.0, 8.0]


def test_a_new_registration_drops_what_an_old_one_held() -> None:
    s = Script()
    s.up()
    s.engine.connection_lost("Connection reset by peer", s.now)
    s.take()
    s.at(s.engine.next_timer() or 0)
    s.engine.connected(s.now)
    # the gateway lost its state and even hands out the same client ID again
    actions = s.register(s.one(), client_id=1)
    assert of(actions, TunnelDown) and of(actions, BindRemoved)
    assert s.one().type is MessageType.ASSIGN_REQUEST_RSAP_IP


def test_asynchronous_deregister_and_free() -> None:
    s = Script()
    s.up()
    actions = s.push(MessageType.FREE_RESPONSE, ClientId(1), BindId(1))
    assert of(actions, TunnelDown)
    assign = s.one()
    assert assign.type is MessageType.ASSIGN_REQUEST_RSAP_IP
    s.assign(assign, bind_id=2)
    actions = s.push(MessageType.DE_REGISTER_RESPONSE, ClientId(1))
    assert of(actions, TunnelDown)
    again = s.one()  # nothing to de-register: straight to REGISTER
    assert again.type is MessageType.REGISTER_REQUEST


def test_asynchronous_messages_over_udp_carry_counter_zero() -> None:
    s = Script(transport="udp")
    s.up()
    assert of(s.push(MessageType.FREE_RESPONSE, ClientId(1), BindId(1)), TunnelDown)


def test_extend_of_a_bind_the_gateway_forgot_asks_for_a_new_block() -> None:
    s = Script()
    s.up()
    s.at(400)
    actions = s.error(s.one(), ErrorCode.BAD_BIND_ID, client_id=1)
    assert of(actions, TunnelDown)
    assert s.one().type is MessageType.ASSIGN_REQUEST_RSAP_IP


def test_tcp_request_without_answer_drops_the_connection() -> None:
    s = Script()
    s.up()
    s.at(400)
    s.one()
    actions = s.at(410)
    assert of(actions, Disconnect) and of(actions, Connect)
    assert s.engine.phase is Phase.CONNECTING


# --- the seed's lines ---------------------------------------------------------------------------
def test_connection_refused() -> None:
    s = Script()
    s.engine.start(0.0)
    s.take()
    s.engine.connection_lost("Connection refused", 0.0)
    failed = failure(s.take())
    assert failed.line == "Unable to connect to RSIP server: Connection refused"
    assert "\n" not in str(failed)


@pytest.mark.parametrize(("code", "line", "hint"), [
    (ErrorCode.REGISTRATION_DENIED, REGISTER_FAILED, "MAX_CLIENTS"),
    (ErrorCode.USE_TCP, REGISTER_FAILED, "--transport tcp"),
])
def test_register_refused(code: ErrorCode, line: str, hint: str) -> None:
    s = Script()
    failed = failure(s.error(s.start(), code))
    assert failed.line == line and hint in failed.detail


@pytest.mark.parametrize(("code", "hint"), [
    (ErrorCode.LOCAL_ADDRPORT_UNAVAILABLE, "-n"),
    (ErrorCode.LOCAL_ADDR_UNAVAILABLE, "POOL"),
    (ErrorCode.BAD_TUNNEL_TYPE, "--tunnel"),
    (ErrorCode.INTERNAL_SERVER_ERROR, "log"),
])
def test_assignment_refused(code: ErrorCode, hint: str) -> None:
    s = Script()
    s.register(s.start())
    failed = failure(s.error(s.one(), code, client_id=1))
    assert failed.line == ASSIGN_FAILED == "Unable to get port assignments!"
    assert code.name in failed.detail and hint in failed.detail


def test_unusable_assignment_is_freed() -> None:
    s = Script()
    s.register(s.start())
    assign = s.one()
    actions = s.reply(assign, MessageType.ASSIGN_RESPONSE_RSAP_IP, ClientId(1), BindId(3),
                      Address.dont_care(), Ports.block(FIRST, 255), Address.dont_care(),
                      Ports.any(1), LeaseTime(LEASE), Tunnel(TunnelType.IP_IP))
    assert failure(actions).line == ASSIGN_FAILED
    s.engine.stop(s.now)
    free = s.one()
    assert free.type is MessageType.FREE_REQUEST and free.bind_id == 3


def test_the_mtu_rule() -> None:
    assert mtu_problem(1468, 1500, TunnelKind.UDP) is None
    assert mtu_problem(1480, 1500, TunnelKind.IPIP) is None
    assert mtu_problem(1476, 1500, TunnelKind.GRE) is None
    problem = mtu_problem(1469, 1500, TunnelKind.UDP)
    assert problem is not None and "-m 1468" in problem
    # the seed's ppp0 example: a path of 1432 and -m 1412
    assert mtu_problem(1412, 1432, TunnelKind.UDP) is not None
    assert mtu_problem(1412, 1432, TunnelKind.IPIP) is None
    s = Script()
    s.up()
    s.engine.tunnel_failed(MTU_PROBLEM, problem, s.now)
    failed = failure(s.take())
    assert str(failed).startswith("Can't send rsip packet. MTU problem. (tunnel MTU 1469")


def test_settings_errors_are_one_line() -> None:
    for kwargs in ({"ports": 256}, {"ports": 0}, {"listens": (0,)}, {"listens": (80, 80)},
                   {"transport": "sctp"}, {"ignored_ports": ((10, 5),)}):
        with pytest.raises(ValueError) as info:
            ClientSettings(**kwargs)
        assert "\n" not in str(info.value)


# --- LISTEN ---------------------------------------------------------------------------------
def test_listen_ports_are_asked_for_after_the_block() -> None:
    s = Script(listens=(80, 81))
    s.up()
    listen = s.one()
    assert listen.type is MessageType.LISTEN_REQUEST
    addresses, ports = listen.all(Address), listen.all(Ports)
    assert addresses[0].value == PUBLIC  # the tunnel's address, not "don't care"
    assert ports[0].expand() == (80,)
    added = of(s.grant_listen(listen, bind_id=2), BindAdded)
    assert added[0].bind.kind == "listen" and added[0].bind.first == 80
    refused = s.one()
    actions = s.error(refused, ErrorCode.LOCAL_ADDRPORT_INUSE, client_id=1)
    assert of(actions, ListenRefused) == [ListenRefused(81, "the server answered "
                                                           "LOCAL_ADDRPORT_INUSE")]
    assert s.engine.phase is Phase.ASSIGNED
    assert s.engine.status(s.now)["listens"]["81"]["state"] == "refused"


def test_auto_listen_asks_lingers_and_frees() -> None:
    s = Script(ignored_ports=((22, 22),))
    s.up()
    s.engine.listening({22, FIRST + 3, 9000}, s.now)  # ignored, inside the block, new
    listen = s.one()
    assert listen.all(Ports)[0].expand() == (9000,)
    s.grant_listen(listen, bind_id=2)
    s.engine.listening({9000}, s.now)
    assert s.sent() == []  # asked once
    s.now = 10.0
    s.engine.listening(set(), s.now)  # the server closed its socket: linger
    assert s.sent() == [] and s.engine.next_timer() == pytest.approx(15.0)
    s.at(12.0)
    s.engine.listening({9000}, s.now)  # back in time (a restart): kept
    s.at(20.0)
    assert s.sent() == []
    s.engine.listening(set(), s.now)
    s.at(25.0)
    free = s.one()
    assert free.type is MessageType.FREE_REQUEST and free.bind_id == 2
    actions = s.reply(free, MessageType.FREE_RESPONSE, ClientId(1), BindId(2))
    assert of(actions, BindRemoved) and "9000" not in s.engine.status(s.now)["listens"]


def test_a_refused_auto_listen_closes_the_sockets_once_and_is_asked_again_later() -> None:
    s = Script()
    s.up()
    s.engine.listening({443}, s.now)
    actions = s.error(s.one(), ErrorCode.LOCAL_ADDRPORT_INUSE, client_id=1)
    assert of(actions, ListenRefused)[0].port == 443
    s.engine.listening({443}, s.now)  # still there (a UDP socket stays bound): not again
    assert s.sent() == [] and not of(s.take(), ListenRefused)
    s.engine.listening(set(), s.now)
    s.engine.listening({443}, s.now)  # a new socket: asked again
    assert s.one().type is MessageType.LISTEN_REQUEST


def test_ports_listened_on_before_the_block_are_asked_for_after_it() -> None:
    s = Script()
    s.engine.start(0.0)
    s.take()
    s.engine.listening({5000, FIRST + 1}, 0.0)
    s.engine.connected(0.0)
    s.register(s.one())
    s.assign(s.one())
    listen = s.one()  # FIRST + 1 came with the block
    assert listen.all(Ports)[0].expand() == (5000,)
    assert s.sent() == []


def test_auto_listen_can_be_off() -> None:
    s = Script(auto_listen=False)
    s.up()
    s.engine.listening({9000}, s.now)
    assert s.sent() == []


# --- stop -----------------------------------------------------------------------------------
def test_stop_frees_every_bind_then_deregisters() -> None:
    s = Script(listens=(80,))
    s.up()
    s.grant_listen(s.one(), bind_id=2)
    s.engine.stop(s.now)
    for bind_id in (1, 2):
        free = s.one()
        assert free.type is MessageType.FREE_REQUEST and free.bind_id == bind_id
        s.reply(free, MessageType.FREE_RESPONSE, ClientId(1), BindId(bind_id))
    deregister = s.one()
    assert deregister.type is MessageType.DE_REGISTER_REQUEST
    actions = s.reply(deregister, MessageType.DE_REGISTER_RESPONSE, ClientId(1))
    assert of(actions, Stopped) and s.engine.phase is Phase.STOPPED
    assert any(isinstance(a, TunnelDown) for a in s.log)


def test_stop_over_udp_with_a_silent_gateway_ends() -> None:
    s = Script(transport="udp")
    s.up()
    s.engine.stop(s.now)
    assert s.one().type is MessageType.FREE_REQUEST
    actions: list[Any] = []
    for _ in range(8):
        actions += s.at(s.engine.next_timer() or s.now)
    assert of(actions, Stopped) and s.engine.next_timer() is None


def test_stop_before_registering_is_immediate() -> None:
    s = Script()
    s.engine.start(0.0)
    s.take()
    s.engine.stop(0.0)
    assert of(s.take(), Stopped)


def test_stop_after_a_failure_still_deregisters() -> None:
    s = Script()
    s.register(s.start())
    s.error(s.one(), ErrorCode.LOCAL_ADDRPORT_UNAVAILABLE, client_id=1)
    s.engine.stop(s.now)
    deregister = s.one()
    assert deregister.type is MessageType.DE_REGISTER_REQUEST
    assert of(s.reply(deregister, MessageType.DE_REGISTER_RESPONSE, ClientId(1)), Stopped)


# --- what is ignored is counted ---------------------------------------------------------------
def test_ignored_messages_are_counted() -> None:
    s = Script()
    s.up()
    s.engine.receive(b"\x01\x02\x00", s.now)  # malformed
    s.engine.receive(wire.encode(Message(MessageType.EXTEND_RESPONSE, (
        ClientId(1), BindId(1), LeaseTime(5)))), s.now)  # answers nothing
    s.push(MessageType.DE_REGISTER_RESPONSE, ClientId(99))  # another registration's news
    s.push(MessageType.FREE_RESPONSE, ClientId(1), BindId(42))  # a bind we never had
    ignored = s.engine.counters.ignored
    assert ignored == {"malformed": 1, "unexpected": 1, "foreign_client_id": 1,
                       "unknown_bind_id": 1}
    assert s.engine.phase is Phase.ASSIGNED and not of(s.take(), TunnelDown)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120))
def test_any_bytes_from_the_server_are_survived(data: bytes) -> None:
    s = Script(transport="udp")
    s.up()
    s.engine.receive(data, s.now)
    s.engine.handle_timer(s.now + 1)
    s.take()


_ANSWER_TYPES = [MessageType.REGISTER_RESPONSE, MessageType.ASSIGN_RESPONSE_RSAP_IP,
                 MessageType.EXTEND_RESPONSE, MessageType.FREE_RESPONSE,
                 MessageType.DE_REGISTER_RESPONSE, MessageType.LISTEN_RESPONSE,
                 MessageType.ERROR_RESPONSE]
_PARAMS = st.one_of(
    st.builds(ClientId, st.integers(0, 3)), st.builds(BindId, st.integers(0, 3)),
    st.builds(LeaseTime, st.integers(0, 1000)),
    st.just(Address.of(PUBLIC)), st.just(Address.dont_care()),
    st.builds(Ports.block, st.integers(1, 60000), st.integers(1, 255)),
    st.builds(Ports.any, st.integers(1, 255)), st.just(Tunnel(TunnelType.IP_IP)),
    st.builds(wire.Error, st.sampled_from(list(ErrorCode))),
    st.builds(MessageCounter, st.integers(0, 4)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_ANSWER_TYPES), st.lists(_PARAMS, max_size=9),
                          st.floats(0, 700)), max_size=12),
       st.sampled_from(["tcp", "udp"]))
def test_any_sequence_of_answers_leaves_the_engine_consistent(
        answers: list[tuple[MessageType, list[Any], float]], transport: str) -> None:
    s = Script(transport=transport, listens=(80,))
    s.start()
    for kind, params, when in answers:
        try:
            data = wire.encode(Message(kind, tuple(params)))
        except (wire.RsipWireError, ValueError):
            continue
        s.now = max(s.now, when)
        s.engine.receive(data, s.now)
        s.engine.handle_timer(s.now)
        s.take()
    main = s.engine.main_bind
    assert main is None or main.bind_id in s.engine.binds
    s.engine.stop(s.now)
    for _ in range(20):
        if any(isinstance(a, Stopped) for a in s.take()):
            break
        s.engine.connection_lost("gone", s.now)


# --- against the gateway engine, in memory --------------------------------------------------
def _gateway() -> Any:
    from ipshift.rsip.gateway import GatewayEngine, GatewaySettings
    from ipshift.rsip.leases import LeasePolicy, Leases

    return GatewayEngine(Leases(LeasePolicy(pool=(PUBLIC,), own=(PUBLIC,),
                                            port_range=(10000, 19999), listen_range=(1, 1023))),
                         GatewaySettings(tunnel_port=GW_TUNNEL_PORT))


class Wire:
    """Client and gateway engines joined by an in-memory channel (bytes both ways)."""

    def __init__(self, transport: str, drop_first: int = 0, **settings: Any) -> None:
        from ipshift.rsip.gateway import Origin

        self.gateway = _gateway()
        self.client = ClientEngine(ClientSettings(transport=transport, **settings), SERVER)
        self.origin = Origin(transport, "192.0.2.10", 40000, 1)
        self.now = 0.0
        self.drop = drop_first
        self.events: list[Any] = []
        self.gateway_sends = 0

    def run(self, until: float) -> None:
        """Exchange until quiet, following both engines' timers up to `until`."""
        from ipshift.rsip.gateway import Send as GatewaySend

        for _ in range(10_000):
            moved = False
            for action in self.client.actions():
                moved = True
                self.events.append(action)
                if isinstance(action, Connect):
                    self.client.connected(self.now)
                elif isinstance(action, Send):
                    if self.drop:
                        self.drop -= 1
                        continue
                    self.gateway.receive(wire.encode(action.message), self.origin, self.now)
            for action in self.gateway.actions():
                if isinstance(action, GatewaySend):
                    moved = True
                    self.gateway_sends += 1
                    self.client.receive(wire.encode(action.message), self.now)
            if moved:
                continue
            times = [t for t in (self.client.next_timer(), self.gateway.next_timer())
                     if t is not None and t <= until]
            if not times:
                break
            self.now = max(self.now, min(times))
            self.client.handle_timer(self.now)
            self.gateway.handle_timer(self.now)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_against_the_gateway_engine(transport: str) -> None:
    link = Wire(transport, listens=(80,))
    link.client.start(0.0)
    link.run(until=1.0)
    (up,) = link.of(TunnelUp)
    assert up == TunnelUp(PUBLIC, 10000, 10254, SERVER, TunnelKind.UDP, GW_TUNNEL_PORT)
    clients = link.gateway.leases.clients
    assert len(clients) == 1
    (client,) = clients.values()
    assert sorted((b.first, b.last) for b in client.binds.values()) == [(80, 80),
                                                                        (10000, 10254)]
    assert client.tunnel_port == 4556
    # a day of leases: extended in time, never lost
    link.run(until=86400.0)
    assert not link.of(TunnelDown) and len(client.binds) == 2
    assert link.client.phase is Phase.ASSIGNED
    # an application starts listening on 15000; later closes it
    link.client.listening({15000}, link.now)
    link.run(until=link.now)
    assert any(b.first == 15000 for b in client.binds.values())
    link.client.listening(set(), link.now)
    link.run(until=link.now + 10)
    assert not any(b.first == 15000 for b in client.binds.values())
    link.client.stop(link.now)
    link.run(until=link.now + 10)
    assert link.of(Stopped) and not link.gateway.leases.clients


def test_against_the_gateway_engine_over_lossy_udp_leases_once() -> None:
    link = Wire("udp", drop_first=2)
    link.client.start(0.0)
    link.run(until=1.0)
    assert link.of(TunnelUp) and link.client.counters.retransmissions == 2
    (client,) = link.gateway.leases.clients.values()
    assert len(client.binds) == 1


def test_against_a_gateway_that_restarted_without_its_leases() -> None:
    link = Wire("tcp")
    link.client.start(0.0)
    link.run(until=1.0)
    link.gateway = _gateway()  # all state gone
    link.run(until=500.0)      # the extension at 400 s finds out
    assert len(link.of(TunnelUp)) == 2 and len(link.of(TunnelDown)) == 1
    assert link.client.phase is Phase.ASSIGNED and len(link.gateway.leases.clients) == 1


def test_against_the_gateway_after_a_client_restart() -> None:
    link = Wire("tcp")
    link.client.start(0.0)
    link.run(until=1.0)
    # kill -9 and start: a new engine, the gateway still holds the old registration
    link.client = ClientEngine(ClientSettings(), SERVER)
    link.events.clear()
    link.client.start(link.now)
    link.run(until=2.0)
    assert link.of(TunnelUp) and link.client.client_id == 2
    (client,) = link.gateway.leases.clients.values()
    assert client.client_id == 2 and len(client.binds) == 1


# --- the command line -----------------------------------------------------------------------
def _parse(argv: list[str]) -> argparse.Namespace:
    from ipshift.rsip.clientcli import add_client_arguments, run

    parser = argparse.ArgumentParser(prog="rsipclient")
    add_client_arguments(parser)
    parser.set_defaults(handler=run)
    return parser.parse_args(argv)


def test_command_line_to_config() -> None:
    from ipshift.rsip.clientcli import client_config_from

    config = client_config_from(_parse(["-s", "192.0.2.1", "-p", "4600", "-l", "80", "-l",
                                        "22", "-m", "1400", "-n", "100", "--transport", "udp",
                                        "--tunnel", "gre", "--ignore-port", "6010-6020"]))
    assert config.server == SERVER and config.port == 4600 and config.mtu == 1400
    assert config.settings.listens == (80, 22) and config.settings.ports == 100
    assert config.settings.transport == "udp" and config.settings.tunnel is TunnelKind.GRE
    assert config.settings.ignored_ports == ((6010, 6020),) and config.dev == "rsip0"


def test_command_line_errors_are_one_line() -> None:
    from ipshift.rsip.clientcli import client_config_from
    from ipshift.ui import UserError

    for argv in (["-n", "300"], ["-m", "100"], ["--dev", "a/b"], ["-l", "70000"]):
        with pytest.raises(UserError) as info:
            client_config_from(_parse(argv))
        assert "\n" not in str(info.value)


def test_status_and_stop_actions_keep_the_device() -> None:
    from ipshift.rsip.clientcli import _socket_for

    args = _parse(["--dev", "rsip1", "status", "--json"])
    assert args.client_command == "status" and str(_socket_for(args)).endswith(
        "rsipclient-rsip1.sock")
    args = _parse(["stop", "--dev", "rsip2"])
    assert str(_socket_for(args)).endswith("rsipclient-rsip2.sock")


def test_status_rendering_has_the_krsip_shape() -> None:
    from ipshift.rsip.clientcli import render_status

    doc = {"client": {"state": "assigned", "client_id": 7, "registration_s": 172,
                      "transport": "udp", "server": "192.0.2.1", "port": 4555,
                      "tunnel": "rsip0", "tunnel_kind": "udp", "endpoint": "192.0.2.1",
                      "gateway_udp_port": 4556, "local": "192.0.2.10", "mtu": 1468,
                      "port_range": "8192-8446"},
           "binds": [{"address": "203.0.113.1", "ports": "8192-8446", "bind_id": 1,
                      "lease_s": 25, "used": 1},
                     {"address": "203.0.113.1", "ports": "80", "bind_id": 2,
                      "lease_s": 43, "used": 1}],
           "listens": {"81": {"state": "refused"}}, "ignored_ports": ["6010-6010"]}
    lines = render_status(doc).splitlines()
    assert lines[0].split() == ["STATE", "CLIENT", "ID", "RLT", "PROTO", "SERVER", "PORT",
                                "TUNNEL"]
    assert lines[1].split() == ["assigned", "7", "172", "udp", "192.0.2.1", "4555", "rsip0"]
    assert lines[2].split() == ["LEASED", "ADDRESS", "PORTS", "BIND", "ID", "LEASE", "TIME",
                                "USED"]
    assert lines[3].split() == ["203.0.113.1", "8192-8446", "1", "25", "1"]
    assert lines[4].split() == ["203.0.113.1", "80", "2", "43", "1"]
    assert lines[5:7] == ["RULES (policy ACCEPT)", "I6010-6010"]
    assert "81" in lines[7] and "udp to 192.0.2.1:4556" in lines[8]
