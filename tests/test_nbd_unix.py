"""`vdisk serve --socket PATH`: NBD over a Unix socket (as qemu-nbd -k), with real clients.

libvirt and qemu often reach a local NBD server through a socket file rather than a TCP
port: nothing else on the machine can connect unless the file's permissions allow it."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import vdisk
from tests.conftest import need, pattern, run, vdisk_cli
from tests.test_nbd import ServerProcess, patterned

MiB = 1 << 20


class UnixServed(ServerProcess):
    """`vdisk serve --socket`: the URI of its default export is ``url``."""

    def __init__(self, image: Path, sock: Path, *args: str) -> None:
        super().__init__(str(image), "--socket", str(sock), *args)
        self.sock = sock
        line = self.first_line()  # printed once it listens
        assert line.startswith("serving "), (line, self.proc.stderr and self.proc.stderr.read())
        self.url = f"nbd+unix:///?socket={sock}"
        assert self.url in line, line


@pytest.fixture
def serve_unix(started: Callable[[UnixServed], UnixServed]) -> Callable[[Path, Path], UnixServed]:
    need("qemu-img")
    return lambda image, sock: started(UnixServed(image, sock))


def test_clients_read_and_write_through_a_unix_socket(tmp_path, serve_unix):
    need("qemu-io")
    img = patterned(tmp_path / "a.vdisk")
    sock = tmp_path / "nbd.sock"
    s = serve_unix(img, sock)
    assert sock.is_socket()
    raw = tmp_path / "ref.raw"
    raw.write_bytes(pattern(0, 8 * MiB))
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(raw), s.url])
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 65000 70000", "-c", "flush", s.url])
    run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 65000 70000", s.url])
    assert s.stop() == 0
    assert not sock.exists(), "the socket file outlived the server"
    with vdisk.open(str(img), readonly=True) as d:
        assert d.read(65000, 70000) == b"\x5a" * 70000
        assert d.read(0, 65000) == pattern(0, 65000)


def test_a_stale_socket_file_is_replaced_a_live_one_refused(tmp_path, serve_unix):
    a = patterned(tmp_path / "a.vdisk")
    b = patterned(tmp_path / "b.vdisk")
    sock = tmp_path / "nbd.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock))  # a file left by a server that was killed: nobody listens
    stale.close()
    s = serve_unix(a, sock)
    p = vdisk_cli("serve", str(b), "--socket", str(sock), check=False, timeout=30)
    assert p.returncode == 1, p
    assert "another server is listening" in p.stderr and "Traceback" not in p.stderr
    run(["qemu-img", "info", s.url])  # the first server is unharmed
    s.stop()


def test_socket_refusals_are_one_line(tmp_path):
    img = patterned(tmp_path / "a.vdisk")
    other = tmp_path / "notes.txt"
    other.write_text("keep me\n")
    p = vdisk_cli("serve", str(img), "--socket", str(other), check=False, timeout=30)
    assert p.returncode == 1 and "is not a socket" in p.stderr, p
    assert other.read_text() == "keep me\n"
    p = vdisk_cli("serve", str(img), "--socket", str(tmp_path / "s"), "--port", "5000", check=False)
    assert p.returncode == 2 and "do not go together" in p.stderr, p
    deep = tmp_path / ("d" * 120) / "s.sock"
    deep.parent.mkdir()
    t = time.monotonic()
    p = vdisk_cli("serve", str(img), "--socket", str(deep), check=False, timeout=30)
    assert p.returncode == 1 and "cannot listen on" in p.stderr, p
    assert len(p.stderr.strip().splitlines()) == 1 and time.monotonic() - t < 30
