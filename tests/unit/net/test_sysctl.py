"""ipshift.net.sysctl: key forms, and reads/writes against a stand-in /proc/sys tree."""

import errno
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift.net import sysctl
from ipshift.net.errors import NetError
from ipshift.net.sysctl import SysctlError, key_name, key_parts


@pytest.mark.parametrize(("key", "parts"), [
    ("net.ipv4.ip_forward", ("net", "ipv4", "ip_forward")),
    ("net.ipv4.conf.all.rp_filter", ("net", "ipv4", "conf", "all", "rp_filter")),
    ("net.ipv4.conf.eth0.100.rp_filter", ("net", "ipv4", "conf", "eth0.100", "rp_filter")),
    ("net.ipv6.conf.br0.10.20.accept_ra", ("net", "ipv6", "conf", "br0.10.20", "accept_ra")),
    ("net.ipv4.neigh.eth0.7.gc_stale_time", ("net", "ipv4", "neigh", "eth0.7", "gc_stale_time")),
    ("net.mpls.conf.eth0.5.input", ("net", "mpls", "conf", "eth0.5", "input")),
    ("net.ipv4.conf.eth0/100.rp_filter", ("net", "ipv4", "conf", "eth0.100", "rp_filter")),
    ("net/ipv4/conf/eth0.100/rp_filter", ("net", "ipv4", "conf", "eth0.100", "rp_filter")),
    (["net", "ipv4", "conf", "eth0.100", "rp_filter"],
     ("net", "ipv4", "conf", "eth0.100", "rp_filter")),
    (("net", "core", "somaxconn"), ("net", "core", "somaxconn")),
])
def test_key_forms(key, parts):
    assert key_parts(key) == parts


def test_dots_elsewhere_are_separators():
    # only the per-interface groups take dotted names; nothing to join elsewhere
    assert key_parts("net.ipv4.tcp_rmem") == ("net", "ipv4", "tcp_rmem")
    assert key_parts("kernel.a.b.c.d.e") == ("kernel", "a", "b", "c", "d", "e")


@pytest.mark.parametrize("key", [
    "", "net..ipv4", "net.ipv4.", "../etc/passwd", "net/../../etc/shadow", ["net", "a/b"],
    ["net", ".."], ["net", ""], ["net", " x"], [], "net.ipv4.ip_forward\0", ["net", 4],
])
def test_malformed_keys_are_refused_in_one_line(key):
    with pytest.raises(ValueError) as info:
        key_parts(key)
    assert "\n" not in str(info.value)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=60))
def test_any_text_is_a_key_or_a_value_error(text):
    try:
        parts = key_parts(text)
    except ValueError:
        return
    assert parts and all(p and "/" not in p and p not in (".", "..") for p in parts)
    assert os.path.normpath(sysctl.key_path(text)).startswith(sysctl.PROC_SYS + "/")


part = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="/"),
               min_size=1, max_size=12).filter(lambda p: p not in (".", ".."))


@settings(max_examples=300, deadline=None)
@given(st.lists(part, min_size=1, max_size=6))
def test_list_and_slashed_forms_keep_every_part(parts):
    assert key_parts(parts) == tuple(parts)
    if len(parts) > 1 and "." not in parts[0]:  # a slash first: the slashed form
        assert key_parts("/".join(parts)) == tuple(parts)


@pytest.fixture
def proc_sys(tmp_path, monkeypatch):
    """A stand-in /proc/sys with a few keys."""
    monkeypatch.setattr(sysctl, "PROC_SYS", str(tmp_path))
    for key, value in (("net/ipv4/ip_forward", "0"), ("net/ipv6/conf/all/forwarding", "0"),
                       ("net/ipv4/conf/eth0.100/rp_filter", "1"),
                       ("net/ipv4/tcp_rmem", "4096\t131072\t6291456")):
        path = tmp_path / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value + "\n")
    return tmp_path


def test_read_and_write(proc_sys):
    assert sysctl.read("net.ipv4.conf.eth0.100.rp_filter") == "1"
    sysctl.write("net.ipv4.conf.eth0.100.rp_filter", 2)
    assert (proc_sys / "net/ipv4/conf/eth0.100/rp_filter").read_text() == "2\n"
    sysctl.write(["net", "ipv4", "ip_forward"], True)
    assert sysctl.read("net/ipv4/ip_forward") == "1"
    assert sysctl.read("net.ipv4.tcp_rmem").split("\t") == ["4096", "131072", "6291456"]
    with pytest.raises(ValueError):
        sysctl.write("net.ipv4.ip_forward", "1\n0")


def test_forwarding_is_either_family(proc_sys):
    assert not sysctl.forwarding()
    sysctl.write("net.ipv6.conf.all.forwarding", 1)
    assert sysctl.forwarding() and sysctl.forwarding(family=socket.AF_INET6)
    assert not sysctl.forwarding(family=socket.AF_INET)
    (proc_sys / "net/ipv6/conf/all/forwarding").unlink()  # IPv6 disabled: counts as off
    assert not sysctl.forwarding()
    with pytest.raises(ValueError):
        sysctl.forwarding(family=socket.AF_PACKET)


def test_a_missing_key_says_which_in_one_line(proc_sys):
    with pytest.raises(SysctlError) as info:
        sysctl.read("net.ipv4.conf.eth9.rp_filter")
    assert info.value.errno == errno.ENOENT
    assert str(info.value) == ("sysctl net.ipv4.conf.eth9.rp_filter does not exist: check the "
                               "key (and that the interface it names exists there)")
    with pytest.raises(SysctlError) as info:
        sysctl.write("net.ipv4.nope", 1)  # never creates a file
    assert info.value.errno == errno.ENOENT and not (proc_sys / "net/ipv4/nope").exists()
    assert isinstance(info.value, NetError)


def test_a_group_is_not_a_key(proc_sys):
    with pytest.raises(SysctlError, match="group of keys"):
        sysctl.read("net.ipv4")


def test_permission_and_refused_values_are_one_line(proc_sys, monkeypatch):
    real_open, real_write = os.open, os.write

    def denied(path, flags, *args):
        if flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    monkeypatch.setattr(sysctl.os, "open", denied)
    with pytest.raises(SysctlError) as info:
        sysctl.write("net.ipv4.ip_forward", 1)
    assert info.value.errno == errno.EACCES and "permission denied (run as root" in str(info.value)
    monkeypatch.setattr(sysctl.os, "open", real_open)

    def refused(fd, data):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(sysctl.os, "write", refused)
    with pytest.raises(SysctlError) as info:
        sysctl.write("net.ipv4.ip_forward", 7)
    assert str(info.value) == ("sysctl net.ipv4.ip_forward refused the value '7': check its type "
                               "and range")
    monkeypatch.setattr(sysctl.os, "write", real_write)


def test_a_missing_namespace_is_not_a_missing_key():
    with pytest.raises(SysctlError) as info:
        sysctl.read("net.ipv4.ip_forward", netns="ipsh-no-such-namespace")
    text = str(info.value)
    assert text.startswith("cannot enter namespace ipsh-no-such-namespace") and "\n" not in text


def test_key_name_is_dotted():
    assert key_name(["net", "ipv4", "conf", "eth0.100", "rp_filter"]) == (
        "net.ipv4.conf.eth0.100.rp_filter")
