"""Owned tables without a kernel: names, the ownership mark (round trip, fuzzing), liveness of
the creator, the create transaction, refusal of a live holder, and stale-table selection."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net.errors import ParseError
from ipshift.net.nft import NftError, _name
from ipshift.net.nfttable import (
    COMMENT_MAX,
    TABLE_NAME_MAX,
    FoundTable,
    OwnedTable,
    OwnedTableError,
    TableMark,
    TableMarkError,
    creator_alive,
    own_mark,
    owned_tables,
    pid_namespace,
    process_start,
    remove_stale_tables,
    table_name,
)


def test_table_names():
    assert table_name("resend", "ppp0") == "ipshift_resend_ppp0"
    dotted = table_name("resend", "eth0.100")
    assert dotted.startswith("ipshift_resend_eth0_100_") and len(dotted) == 32
    assert dotted != table_name("resend", "eth0_100") != table_name("resend", "eth0-100")
    long = table_name("sacip", "x" * 64)
    assert len(long) == TABLE_NAME_MAX and long.startswith("ipshift_sacip_xxx")


@pytest.mark.parametrize("owner, instance, message", [
    ("Sacip", "eth0", "owner 'Sacip' must be 1-16 lowercase"),
    ("sa_cip", "eth0", "owner 'sa_cip'"),
    ("", "eth0", "owner ''"),
    ("a" * 17, "eth0", "must be 1-16"),
    ("sacip", "", "instance '' must be 1-64 printable"),
    ("sacip", "x" * 65, "must be 1-64"),
    ("sacip", "a\nb", "printable"),
])
def test_bad_owner_or_instance(owner, instance, message):
    with pytest.raises(ValueError) as info:
        table_name(owner, instance)
    assert message in str(info.value) and "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=64).filter(str.isprintable),
       st.text(min_size=1, max_size=64).filter(str.isprintable))
def test_table_names_are_valid_bounded_and_distinct(a, b):
    name = table_name("owner", a)
    assert _name(name) == name and len(name) <= TABLE_NAME_MAX
    assert all(c.isascii() and (c.isalnum() or c == "_") for c in name)
    if a != b:
        assert name != table_name("owner", b)


def test_mark_format_and_parse():
    mark = TableMark("sacip", "eth0 %x\"", 1234, 5678, 4026531836)
    text = mark.format()
    assert text == ("owner=sacip pid=1234 start=5678 pidns=4026531836 "
                    "instance=eth0%20%25x%22")
    assert TableMark.parse(text) == mark


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=64).filter(str.isprintable),
       st.integers(0, 2**22), st.integers(0, 2**40), st.integers(0, 2**32))
def test_mark_round_trip_fits_a_comment(instance, pid, start, pidns):
    mark = TableMark("resend", instance, pid, start, pidns)
    text = mark.format()
    assert len(text) <= COMMENT_MAX and '"' not in text and "\n" not in text
    back = TableMark.parse(text)
    assert (back.owner, back.pid, back.start, back.pidns) == ("resend", pid, start, pidns)
    if back.instance_cut:
        assert instance.startswith(back.instance) and back.instance != instance
    else:
        assert back.instance == instance


@pytest.mark.parametrize("comment", [
    "", "hello", "owner=sacip", "owner=sacip pid=x start=1 pidns=1",
    "owner=Sacip pid=1 start=1 pidns=1", "owner=sacip pid=1 start=1 pidns=1 extra=2",
    "owner=sacip pid=1 pid=2 start=1 pidns=1", "owner=sacip pid=-1 start=1 pidns=1",
    "owner=sacip pid=1 start=1 pidns=1 instance=%ff",
])
def test_comments_that_are_not_marks(comment):
    with pytest.raises(TableMarkError) as info:
        TableMark.parse(comment)
    assert isinstance(info.value, ParseError) and "\n" not in str(info.value)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=130))
def test_mark_parse_fuzz(text):
    try:
        TableMark.parse(text)
    except TableMarkError:
        pass


def test_creator_liveness():
    mine = own_mark("unit", "x")
    assert mine.pid == os.getpid() and mine.start == process_start(os.getpid())
    assert creator_alive(mine)
    assert not creator_alive(TableMark("unit", "x", mine.pid, mine.start + 1, mine.pidns))
    assert process_start(2**22 + 1) is None  # above pid_max: never a process
    assert not creator_alive(TableMark("unit", "x", 2**22 + 1, 1, pid_namespace()))
    # another PID namespace cannot be judged from here: left alone
    assert creator_alive(TableMark("unit", "x", 2**22 + 1, 1, pid_namespace() + 1))


class FakeNft:
    def __init__(self, tables=None):
        self.tables_ = dict(tables or {})  # (family, name) -> comment or None
        self.texts = []

    def run(self, text, *, echo=False):
        self.texts.append(text)
        if "oops" in text:
            detail = ("Error: syntax error, unexpected junk\n"
                      "chain c { oops }\n          ^^^^\n")
            raise NftError("nft: syntax error, unexpected junk", detail, text)
        return ""

    def table_comment(self, family, name):
        if (family, name) not in self.tables_:
            raise NftError("nft: Could not process rule: No such file or directory")
        return self.tables_[(family, name)]

    def tables(self):
        return list(self.tables_)

    def table_exists(self, family, name):
        return (family, name) in self.tables_

    def delete_table(self, family, name, *, missing_ok=True):
        return self.tables_.pop((family, name), False) is not False


def test_create_is_one_transaction_with_the_mark():
    nft = FakeNft()
    table = OwnedTable(nft, "inet", "unit", "eth0")
    table.create("chain c { }")
    assert nft.texts == [
        "table inet ipshift_unit_eth0\n"
        "delete table inet ipshift_unit_eth0\n"
        "table inet ipshift_unit_eth0 {\n"
        f"comment \"{table.mark.format()}\"\n"
        "chain c { }\n}\n"]
    assert table.spec == "inet ipshift_unit_eth0" and repr(table) == (
        "<OwnedTable inet ipshift_unit_eth0>")


def test_create_errors_name_the_line():
    table = OwnedTable(FakeNft(), "inet", "unit", "eth0")
    with pytest.raises(OwnedTableError) as info:
        table.create("chain c { oops }")
    assert str(info.value) == ("cannot create nftables table inet ipshift_unit_eth0: "
                               "syntax error, unexpected junk (at: chain c { oops })")
    with pytest.raises(ValueError, match="family"):
        OwnedTable(FakeNft(), "inet4", "unit", "eth0")


def test_create_refuses_a_table_of_a_running_process():
    init = TableMark("unit", "eth0", 1, process_start(1) or 0, pid_namespace())
    nft = FakeNft({("inet", "ipshift_unit_eth0"): init.format()})
    table = OwnedTable(nft, "inet", "unit", "eth0")
    with pytest.raises(OwnedTableError) as info:
        table.create()
    assert str(info.value) == ("nftables table inet ipshift_unit_eth0 belongs to running "
                               "process 1: stop that instance first")
    assert nft.texts == []
    table.create(force=True)
    # a dead creator's table, an unmarked one, or our own, is replaced
    for comment in (TableMark("unit", "eth0", 2**22 + 1, 5, pid_namespace()).format(), None,
                    "something else", table.mark.format()):
        nft.tables_[("inet", "ipshift_unit_eth0")] = comment
        table.create()
    assert len(nft.texts) == 5


def test_stale_tables_are_those_of_dead_creators():
    dead = TableMark("unit", "gone", 2**22 + 1, 5, pid_namespace()).format()
    live = own_mark("unit", "here").format()
    nft = FakeNft({
        ("inet", "ipshift_unit_gone"): dead,
        ("ip6", "ipshift_unit_here"): live,
        ("inet", "ipshift_unit_plain"): None,  # no mark: left alone
        ("inet", "ipshift_unit_foreign"): dead.replace("owner=unit", "owner=other"),
        ("inet", "ipshift_other_gone"): dead.replace("owner=unit", "owner=other"),
        ("inet", "unrelated"): dead,
    })
    found = {f.name: f for f in owned_tables(nft, "unit")}
    assert set(found) == {"ipshift_unit_gone", "ipshift_unit_here", "ipshift_unit_plain",
                          "ipshift_unit_foreign"}
    assert found["ipshift_unit_plain"].mark is None
    assert found["ipshift_unit_foreign"].mark is None  # a mark of another owner is not ours
    assert remove_stale_tables(nft, "unit") == ["inet ipshift_unit_gone"]
    assert remove_stale_tables(nft, "unit") == []

    def only_main(found: FoundTable) -> bool:
        return found.name == table_name("unit", "main")

    assert remove_stale_tables(nft, "unit", is_live=only_main) == ["ip6 ipshift_unit_here"]
    assert ("inet", "ipshift_unit_plain") in nft.tables_
