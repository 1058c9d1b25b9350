"""ipshift.keyfile: keys of any length the caller names, in the tunnel's key file format.

The format's checks (mode, owner, links, size, text) are tested where they were first written,
tests/unit/tunnel/test_auth.py, through the names tunnel.auth re-exports."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ipshift import keyfile
from ipshift.keyfile import (
    KeyFileError,
    format_key_file,
    parse_key_file,
    read_key_file,
    write_key_file,
)
from ipshift.tunnel import auth
from ipshift.tunnel.config import ConfigError


@pytest.mark.parametrize("length", [16, 32, 64])
def test_a_key_of_the_named_length_is_written_and_read_back(tmp_path: Path, length: int) -> None:
    key = bytes(range(length))
    path = tmp_path / f"k{length}.key"
    write_key_file(str(path), key, "a test key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_key_file(str(path), length) == key


def test_a_key_of_another_length_is_refused_with_both_lengths(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_key_file(str(path), bytes(32))
    with pytest.raises(KeyFileError, match=r"the key has 32 bytes, not 64"):
        read_key_file(str(path), 64)
    with pytest.raises(KeyFileError, match=r"base64 of 16 bytes"):
        parse_key_file("", str(path), 16)


def test_the_default_length_is_the_tunnels_32_bytes(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text(format_key_file(bytes(range(32)), "written as the tunnel writes it"))
    path.chmod(0o600)
    assert keyfile.DEFAULT_LENGTH == 32
    assert read_key_file(str(path)) == auth.read_key_file(str(path)) == bytes(range(32))


def test_an_existing_file_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    path.write_text("precious\n")
    with pytest.raises(FileExistsError):
        write_key_file(str(path), bytes(32))
    assert path.read_text() == "precious\n"


def test_a_key_too_short_to_be_secret_is_never_written(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    with pytest.raises(ValueError, match="at least 16 bytes"):
        write_key_file(str(path), bytes(15))
    assert not path.exists()


def test_a_path_the_system_cannot_take_is_a_key_file_error() -> None:
    with pytest.raises(KeyFileError, match="not a usable path"):
        read_key_file("a\0b")


def test_the_tunnel_names_still_import_and_its_errors_stay_configuration_errors(
        tmp_path: Path) -> None:
    assert auth.KeyFileError is KeyFileError
    assert auth.write_key_file is write_key_file and auth.parse_key_file is parse_key_file
    with pytest.raises(KeyFileError) as caught:
        auth.read_key_file(str(tmp_path / "missing.key"))
    assert isinstance(caught.value, ConfigError) and "cannot open" in str(caught.value)


@settings(max_examples=300)
@given(st.text(max_size=200), st.integers(1, 64))
def test_any_text_is_a_key_of_the_length_or_a_one_line_error(text: str, length: int) -> None:
    try:
        key = parse_key_file(text, "k.key", length)
    except KeyFileError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(key) == length


@settings(max_examples=100)
@given(st.binary(min_size=16, max_size=128), st.text(max_size=80))
def test_format_and_parse_round_trip(key: bytes, comment: str) -> None:
    text = format_key_file(key, comment)
    assert parse_key_file(text, length=len(key)) == key
    assert text.splitlines()[-1] == base64.b64encode(key).decode()
