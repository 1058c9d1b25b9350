"""`ipshift tunnel`: run with a peers file, two local endpoints and headroom; the `peers`
commands (the requests they send and how they show the answers, against canned replies);
`keygen`. The control round trip itself is in the netns tests."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
from pathlib import Path
from typing import Any

import pytest

from ipshift import cli
from ipshift.tunnel.auth import format_key_file, read_key_file
from ipshift.tunnel.cli import config_from_args, register, render_peers
from ipshift.tunnel.config import Endpoint
from ipshift.tunnel.peers import Peer
from ipshift.ui import UserError

KEY = bytes(range(32))
RUN = ["run", "--dev", "tun7", "--local", "192.0.2.1:4789"]
PEERS_FILE = """
[[peer]]
name = "branch1"
endpoint = "192.0.2.2:4789"
prefixes = ["198.51.100.0/26"]
key_file = "branch1.key"

[[peer]]
name = "v6"
endpoint = "[2001:db8::2]:4789"
prefixes = ["198.51.100.64/26"]
"""
REPLY = {
    "generation": 7,
    "peers": [
        {"name": "branch1", "endpoint": "192.0.2.2:4789", "encapsulation": "udp",
         "prefixes": ["198.51.100.0/26"], "addresses": ["203.0.113.9"], "port_ranges": [],
         "extra_sources": ["192.0.2.128/25"], "gre_key": None, "authenticated": True,
         "counters": {"datagrams_out": 123456, "datagrams_in": 1200,
                      "tun_read_bytes": 987654321, "receive_bytes": 4567,
                      "foreign_source": 3, "auth_refused": 0}},
        {"name": "legacy", "endpoint": "192.0.2.5", "encapsulation": "gre", "prefixes": [],
         "addresses": [], "port_ranges": ["203.0.113.7/tcp/1024-2047",
                                          "203.0.113.7/udp/1024-2047", "203.0.113.7/icmp/0-99"],
         "extra_sources": [], "gre_key": 7, "authenticated": False, "counters": {}},
    ],
    "drops": {"no_peer": 4, "unknown_endpoint": 0, "auth_refused": 2},
}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["tunnel", *argv])


@pytest.fixture
def peers_file(tmp_path: Path) -> Path:
    key = tmp_path / "branch1.key"
    key.write_text(format_key_file(KEY))
    key.chmod(0o600)
    path = tmp_path / "peers.toml"
    path.write_text(PEERS_FILE)
    return path


class FakeDaemon:
    """Stands in for the control socket: records each call and answers from `replies`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, **replies: Any) -> None:
        self.calls: list[tuple[Path, str, dict[str, Any]]] = []
        self.replies = replies
        monkeypatch.setattr("ipshift.tunnel.cli.call", self.call)

    def call(self, path: Path, method: str, /, **params: Any) -> Any:
        self.calls.append((path, method, params))
        reply = self.replies[method.replace("-", "_")]
        if isinstance(reply, Exception):
            raise reply
        return reply


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(["tunnel", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


# --- run --------------------------------------------------------------------------------------
def test_run_takes_its_peers_from_a_file(peers_file: Path) -> None:
    config = config_from_args(parse(*RUN, "--local", "[2001:db8::1]:4789",
                                    "--peers", str(peers_file), "--headroom", "24",
                                    "--serve", "203.0.113.0/28"))
    assert config.remote is None and [p.name for p in config.peers] == ["branch1", "v6"]
    assert config.peers[0].key == KEY and config.peers[1].key is None
    assert config.local == Endpoint.parse("192.0.2.1:4789")
    assert config.extra_local == Endpoint.parse("[2001:db8::1]:4789")
    assert config.headroom == 24 and config.authenticated
    assert [str(p) for p in config.serve or ()] == ["203.0.113.0/28"]


def test_run_with_remote_is_as_before() -> None:
    config = config_from_args(parse(*RUN, "--remote", "192.0.2.2:4789", "--serve", "any"))
    assert config.remote == Endpoint.parse("192.0.2.2:4789") and config.peers == ()
    assert config.extra_local is None and config.headroom == 0 and config.serve is None


@pytest.mark.parametrize(("extra", "message"), [
    ([], r"^no peer: give it with --remote ADDR:PORT, or several with --peers FILE"),
    (["--remote", "192.0.2.2:4789", "--peers", "x.toml"],
     "^--remote and --peers exclude each other"),
    (["--peers", "/nonexistent/peers.toml"], "^cannot read peers file /nonexistent/peers.toml"),
    (["--remote", "192.0.2.2:4789", "--local", "[2001:db8::1]:1", "--local", "192.0.2.9:1"],
     "^--local is given at most twice"),
    (["--remote", "192.0.2.2:4789", "--local", "192.0.2.9:1"],
     "^a second --local must be of the other IP family"),
    (["--remote", "192.0.2.2:4789", "--headroom", "999"], "^--headroom must be 0..256"),
    (["--remote", "192.0.2.2:4789", "--serve", "198.51.100.1/24"], "^--serve: "),
])
def test_run_errors_are_one_line(extra: list[str], message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        config_from_args(parse(*RUN, *extra))
    assert "\n" not in str(info.value)


def test_run_refuses_a_peers_file_without_peers(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("# no peers yet\n")
    expected = re.escape(f"{empty} lists no peers; add [[peer]] tables")
    with pytest.raises(UserError, match=f"^{expected}"):
        config_from_args(parse(*RUN, "--peers", str(empty)))


def test_run_names_the_file_peer_and_key_of_a_bad_entry(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[peer]]\nname = "b"\nendpoint = "192.0.2.2:4789"\nprefixes = "x"\n')
    expected = re.escape(f"{bad}: peer 'b': prefixes: must be a list")
    with pytest.raises(UserError, match=f"^{expected}"):
        config_from_args(parse(*RUN, "--peers", str(bad)))


def test_a_v6_peer_without_a_v6_local_endpoint_is_refused(peers_file: Path) -> None:
    with pytest.raises(UserError, match=r"peer 'v6' .*give --local for IPv6 too"):
        config_from_args(parse(*RUN, "--peers", str(peers_file)))


# --- peers: listing ---------------------------------------------------------------------------
def test_peers_are_shown_as_a_table(monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    daemon = FakeDaemon(monkeypatch, peers=REPLY)
    rc, out, _ = run_cli(capsys, "peers", "--dev", "tun7")
    assert rc == 0 and daemon.calls == [(Path("/run/ipshift/tunnel-tun7.sock"), "peers", {})]
    lines = out.splitlines()
    assert lines[0] == "generation 7, 2 peers"
    assert lines[1].split() == ["NAME", "ENDPOINT", "ENCAP", "OWNS", "AUTH", "DATAGRAMS",
                                "OUT/IN", "BYTES", "OUT/IN", "DROPS"]
    assert lines[2].split() == ["branch1", "192.0.2.2:4789", "udp",
                                "198.51.100.0/26,203.0.113.9;", "from", "192.0.2.128/25",
                                "yes", "123k/1200", "988M/4567", "foreign_source:3"]
    assert lines[3].split() == ["legacy", "192.0.2.5", "gre", "key", "7",
                                "203.0.113.7/tcp/1024-2047,203.0.113.7/udp/1024-2047", "(+1)",
                                "no", "-/-", "-/-", "-"]
    assert lines[4] == "drops: no_peer 4, auth_refused 2"


def test_peers_json_is_the_reply_itself(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    FakeDaemon(monkeypatch, peers=REPLY)
    rc, out, _ = run_cli(capsys, "peers", "--dev", "tun7", "--json")
    assert rc == 0 and json.loads(out) == REPLY


def test_an_empty_or_odd_reply_still_prints() -> None:
    assert render_peers({}) == "generation -, 0 peers\n(none)\ndrops: none"
    assert "-/-" in render_peers({"peers": [{"name": "x"}], "drops": None})


# --- peers: changes ---------------------------------------------------------------------------
def test_set_sends_the_peer_and_its_key_file(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    daemon = FakeDaemon(monkeypatch, peer_set={"generation": 8, "added": True})
    rc, out, _ = run_cli(capsys, "peers", "--dev", "tun7", "set", "branch2",
                         "--endpoint", "192.0.2.3:4789", "--prefix", "198.51.100.128/26",
                         "--prefix", "2001:db8:2::/48", "--address", "203.0.113.10",
                         "--port-range", "203.0.113.7/udp/4096-5119",
                         "--extra-source", "192.0.2.0/28", "--key-file", "keys/b2.key")
    assert rc == 0 and out == "peer 'branch2' added (generation 8)\n"
    ((path, method, params),) = daemon.calls
    assert path == Path("/run/ipshift/tunnel-tun7.sock") and method == "peer-set"
    assert params["key_file"] == os.path.abspath("keys/b2.key")
    peer = Peer.from_dict(params["peer"])
    assert peer.name == "branch2" and str(peer.endpoint) == "192.0.2.3:4789"
    assert [str(p) for p in peer.prefixes] == ["198.51.100.128/26", "2001:db8:2::/48"]
    assert [str(a) for a in peer.addresses] == ["203.0.113.10"]
    assert [str(r) for r in peer.port_ranges] == ["203.0.113.7/udp/4096-5119"]
    assert [str(p) for p in peer.extra_sources] == ["192.0.2.0/28"]


def test_set_of_a_gre_peer_without_a_key(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    daemon = FakeDaemon(monkeypatch, peer_set={"generation": 9, "added": False})
    rc, out, _ = run_cli(capsys, "peers", "--dev", "tun7", "set", "legacy", "--endpoint",
                         "192.0.2.5", "--encapsulation", "gre", "--gre-key", "7")
    assert rc == 0 and out == "peer 'legacy' updated (generation 9)\n"
    params = daemon.calls[0][2]
    assert params == {"peer": {"name": "legacy", "endpoint": "192.0.2.5",
                               "encapsulation": "gre", "gre_key": 7}, "key_file": None}


def test_options_may_follow_the_action(monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    daemon = FakeDaemon(monkeypatch, peer_remove={"generation": 3})
    rc, out, _ = run_cli(capsys, "peers", "remove", "branch1", "--dev", "tun7", "--json")
    assert rc == 0 and json.loads(out) == {"generation": 3}
    assert daemon.calls == [(Path("/run/ipshift/tunnel-tun7.sock"), "peer-remove",
                             {"name": "branch1"})]
    args = parse("peers", "--dev", "tun7", "--socket", "/tmp/t.sock", "--json", "remove", "x")
    assert args.dev == "tun7" and args.socket == "/tmp/t.sock" and args.json


def test_remove_prints_the_generation(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    FakeDaemon(monkeypatch, peer_remove={"generation": 4})
    rc, out, _ = run_cli(capsys, "peers", "--socket", "/tmp/t.sock", "remove", "branch1")
    assert rc == 0 and out == "peer 'branch1' removed (generation 4)\n"


@pytest.mark.parametrize(("argv", "message"), [
    (["set", "b", "--endpoint", "192.0.2.3:4789", "--prefix", "198.51.100.1/24"],
     "peer 'b': --prefix: '198.51.100.1/24' has host bits set; write 198.51.100.0/24"),
    (["set", "b", "--endpoint", "192.0.2.3"], "peer 'b': --endpoint: '192.0.2.3' is not "
                                              "ADDRESS:PORT"),
    (["set", "b", "--endpoint", "192.0.2.3:1", "--gre-key", "7"],
     "peer 'b': a GRE key (0-4294967295) belongs to gre peers only"),
    (["set", "b", "--endpoint", "192.0.2.3:1", "--port-range", "203.0.113.7/tcp"],
     "peer 'b': --port-range: port range '203.0.113.7/tcp' is not"),
    (["set", "b c", "--endpoint", "192.0.2.3:1"], "peer 'b c': a peer name is"),
    (["set", "b", "--endpoint", "192.0.2.3:1", "--address", "x"],
     "peer 'b': --address: 'x' is not an IP address"),
    (["set", "b", "--endpoint", "192.0.2.3:1", "--key-file", ""],
     "peer 'b': --key-file: must be the path of a key file"),
])
def test_set_errors_are_one_line_before_anything_is_sent(
    argv: list[str], message: str, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    daemon = FakeDaemon(monkeypatch)
    rc, out, err = run_cli(capsys, "peers", "--dev", "tun7", *argv)
    assert rc == 2 and not daemon.calls and not out
    assert err.startswith(f"ipshift: {message}"), err
    assert err.count("\n") == 1, err


def test_the_daemons_refusal_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    refusal = UserError("this tunnel has one --remote peer; start it with --peers FILE to "
                        "change peers while it runs")
    FakeDaemon(monkeypatch, peer_remove=refusal)
    rc, _, err = run_cli(capsys, "peers", "--dev", "tun7", "remove", "x")
    assert rc == 2 and err == f"ipshift: {refusal}\n"


def test_no_tunnel_named_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run_cli(capsys, "peers", "remove", "x")
    assert rc == 2 and err.startswith("ipshift: no tunnel given: name its device with --dev")
    assert err.count("\n") == 1


def test_load_checks_the_file_then_has_the_daemon_read_it(
        peers_file: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    daemon = FakeDaemon(monkeypatch, peers_load={"generation": 12, "peers": 2})
    monkeypatch.chdir(peers_file.parent)
    rc, out, _ = run_cli(capsys, "peers", "--dev", "tun7", "load", peers_file.name)
    assert rc == 0 and out == f"2 peers of {peers_file.name} in force (generation 12)\n"
    # the daemon reads the file (and its key files) from wherever it runs: an absolute path
    assert daemon.calls == [(daemon.calls[0][0], "peers-load", {"path": str(peers_file)})]


def test_load_checks_the_file_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    daemon = FakeDaemon(monkeypatch)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[peer]]\nname = "a"\nendpoint = "192.0.2.2:1"\ngre_key = 3\n')
    rc, _, err = run_cli(capsys, "peers", "--dev", "tun7", "load", str(bad))
    assert rc == 2 and err == f"ipshift: {bad}: peer 'a': a GRE key (0-4294967295) belongs " \
                              "to gre peers only\n"
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    rc, _, err = run_cli(capsys, "peers", "--dev", "tun7", "load", str(empty))
    assert rc == 2 and err.startswith(f"ipshift: {empty} lists no peers; to remove peers")
    assert not daemon.calls


# --- keygen -----------------------------------------------------------------------------------
def test_keygen_writes_a_private_key_file(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b.key"
    rc, out, _ = run_cli(capsys, "keygen", str(path))
    assert rc == 0 and f"wrote a new key to {path} (mode 0600)" in out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = read_key_file(str(path))  # with its checks: mode, owner, one key line
    assert len(key) == 32
    rc, _, _ = run_cli(capsys, "keygen", str(tmp_path / "c.key"))
    assert read_key_file(str(tmp_path / "c.key")) != key


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "b.key"
    path.write_text("precious\n")
    rc, _, err = run_cli(capsys, "keygen", str(path))
    assert rc == 2 and err == (f"ipshift: {path} exists; keygen never overwrites a key: remove "
                               "it first or give another name\n")
    assert path.read_text() == "precious\n"
    link = tmp_path / "link.key"
    link.symlink_to(tmp_path / "elsewhere.key")
    rc, _, err = run_cli(capsys, "keygen", str(link))
    assert rc == 2 and "exists" in err and not (tmp_path / "elsewhere.key").exists()
    rc, _, err = run_cli(capsys, "keygen", str(tmp_path / "no" / "dir.key"))
    assert rc == 2 and err.startswith("ipshift: cannot create ") and err.count("\n") == 1


def test_keygen_prints_a_key_without_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run_cli(capsys, "keygen")
    assert rc == 0
    lines = [line for line in out.splitlines() if not line.startswith("#")]
    assert len(lines) == 1 and len(lines[0]) == 44
