"""Pure pieces of the libnftables wrapper: error lines, names, output parsing, element keys."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net.errors import NetError
from ipshift.net.nft import (
    NftError,
    _family,
    _key,
    _name,
    concat,
    error_line,
    parse_output,
    parse_table_comment,
)


def test_error_line_from_text_command():
    detail = ("Error: Could not process rule: No such file or directory\n"
              "delete table ip nope\n                ^^^^\n")
    assert error_line(detail, "delete table ip nope") == (
        "nft: Could not process rule: No such file or directory (in: delete table ip nope)")


def test_error_line_from_json_command_strips_location():
    detail = "internal:0:0-0: Error: Could not process rule: No such file or directory\n\n"
    line = error_line(detail, '{"nftables": [' + "x" * 300 + "]}")
    assert line.startswith("nft: Could not process rule: No such file or directory (in: ")
    assert len(line) < 250 and "\n" not in line


def test_error_line_without_error_marker():
    assert error_line("\n  something odd \n") == "nft: something odd"
    assert error_line("") == "nft: failed"


def test_nft_error_is_a_net_error():
    err = NftError("nft: x", "detail", "cmd")
    assert isinstance(err, NetError) and str(err) == "nft: x" and err.detail == "detail"


def test_names_and_families_are_checked():
    assert _family("inet") == "inet"
    assert _name("ipshift_routes") == "ipshift_routes"
    for bad in ("", "1abc", "a b", "a;flush ruleset"):
        with pytest.raises(ValueError):
            _name(bad)
    with pytest.raises(ValueError, match="family"):
        _family("ipv4")


def test_tuple_keys_become_concatenations():
    assert _key(("192.0.2.1", 80)) == {"concat": ["192.0.2.1", 80]}
    assert _key("192.0.2.1") == "192.0.2.1"
    assert concat("a", 1) == {"concat": ["a", 1]}


def test_parse_output():
    assert parse_output("") == {}
    assert parse_output('{"nftables": []}\n') == {"nftables": []}
    with pytest.raises(NftError):
        parse_output("[1, 2]")
    with pytest.raises(NftError):
        parse_output("{oops")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_output_fuzz(text):
    try:
        assert isinstance(parse_output(text), dict)
    except NftError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300), st.text(max_size=300))
def test_error_line_is_always_one_line(detail, command):
    line = error_line(detail, command)
    assert line.startswith("nft: ") and "\n" not in line


def test_parse_table_comment():
    listing = ('table inet ipshift_sacip_eth0 {\n\tcomment "owner=sacip pid=1"\n'
               '\tchain c {\n\t}\n}\n')
    assert parse_table_comment(listing) == "owner=sacip pid=1"
    assert parse_table_comment('table ip t {\n\tcomment ""\n}\n') == ""
    assert parse_table_comment("table ip t {\n\tchain c {\n\t}\n}\n") is None
    assert parse_table_comment("table ip t {\n}\n") is None
    assert parse_table_comment('table ip t {\n\tcomment "\n}') is None
    assert parse_table_comment("") is None
    # a comment-like line of a later table does not count
    assert parse_table_comment('table ip a {\n}\ntable ip b {\n\tcomment "x"\n}') is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_parse_table_comment_fuzz(text):
    comment = parse_table_comment(text)
    assert comment is None or isinstance(comment, str)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters='"\n', codec="utf-8"),
               max_size=128))
def test_parse_table_comment_round_trip(comment):
    listing = f'table inet t {{\n\tcomment "{comment}"\n\tchain c {{\n\t}}\n}}\n'
    assert parse_table_comment(listing) == comment
