"""Netlink framing: round trips, and malformed datagrams raise only ParseError."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net import nlmsg
from ipshift.net.errors import ParseError


def test_message_and_attribute_round_trip():
    attrs = nlmsg.attr(1, b"abc") + nlmsg.attr(2, nlmsg.attr(3, b"\x01\x02\x03\x04"), nested=True)
    data = nlmsg.message(20, 0x301, 7, attrs) + nlmsg.message(nlmsg.NLMSG_ERROR, 0, 8,
                                                             (-13).to_bytes(4, "little",
                                                                            signed=True))
    msgs = list(nlmsg.messages(data))
    assert [(m.type, m.flags, m.seq) for m in msgs] == [(20, 0x301, 7), (nlmsg.NLMSG_ERROR, 0, 8)]
    parsed = dict(nlmsg.attributes(msgs[0].body))
    assert parsed[1] == b"abc"  # padding stripped
    assert dict(nlmsg.attributes(parsed[2])) == {3: b"\x01\x02\x03\x04"}  # nested flag masked
    assert nlmsg.error_code(msgs[1].body) == 13
    assert nlmsg.error_code(b"", required=False) == 0


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=200))
def test_malformed_input_raises_only_parse_error(data):
    try:
        for msg in nlmsg.messages(data):
            list(nlmsg.attributes(msg.body))
            nlmsg.error_code(msg.body, required=False)
    except ParseError:
        pass
