"""`vdisk serve --tls-cert/--tls-key [--tls-ca]`: NBD over TLS with real clients (qemu-img,
qemu-io, nbdinfo, nbdcopy), certificates made by openssl.

A server with TLS serves nothing in the clear: a plain client is refused with
NBD_REP_ERR_TLS_REQD, and with --tls-ca a client without a certificate from that CA never
gets past the handshake."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

import vdisk
from tests.conftest import need, pattern, run, vdisk_cli
from tests.test_nbd import RawClient, ServerProcess, patterned

MiB = 1 << 20
SIZE = 8 * MiB


def _openssl(*args: str) -> None:
    run(["openssl", *args])


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, in the file
    names qemu's tls-creds-x509 and libnbd's tls-certificates look for."""
    need("openssl")
    d = tmp_path_factory.mktemp("tls")
    days = ("-days", "2")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/ca-key.pem",
             "-out", f"{d}/ca-cert.pem", *days, "-subj", "/CN=vdisk test CA")  # fmt: skip
    for who, ext in (
        ("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
        ("client", "extendedKeyUsage=clientAuth\n"),
    ):
        (d / f"{who}.ext").write_text("basicConstraints=CA:FALSE\n" + ext)
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{d}/{who}-key.pem",
                 "-out", f"{d}/{who}.csr", "-subj", f"/CN={who}")  # fmt: skip
        _openssl("x509", "-req", "-in", f"{d}/{who}.csr", "-CA", f"{d}/ca-cert.pem",
                 "-CAkey", f"{d}/ca-key.pem", "-CAcreateserial", "-out", f"{d}/{who}-cert.pem",
                 *days, "-extfile", f"{d}/{who}.ext")  # fmt: skip
    return d


class TlsServed(ServerProcess):
    """`vdisk serve` on a free TCP port with TLS options."""

    def __init__(self, image: Path, *args: str) -> None:
        super().__init__(str(image), "--port", "0", "-v", *args)
        line = self.first_line()
        assert "nbds://127.0.0.1:" in line, (line, self.proc.stderr and self.proc.stderr.read())
        self.port = int(line.split("nbds://127.0.0.1:")[1].split("/")[0])

    def qemu(self, creds: Path) -> list[str]:
        """qemu's arguments for this server's default export over TLS."""
        return [
            "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=client",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={self.port},"
            "tls-creds=tls0",
        ]  # fmt: skip

    def url(self, creds: Path) -> str:
        return f"nbds://127.0.0.1:{self.port}/?tls-certificates={creds}"


@pytest.fixture
def serve_tls(started: Callable[[TlsServed], TlsServed]) -> Callable[..., TlsServed]:
    need("qemu-img")
    return lambda image, *args: started(TlsServed(image, *args))


def test_clients_over_tls_and_plain_ones_refused(tmp_path, certs, serve_tls):
    need("qemu-io")
    img = patterned(tmp_path / "a.vdisk")
    s = serve_tls(img, "--tls-cert", f"{certs}/server-cert.pem", "--tls-key",
                  f"{certs}/server-key.pem")  # fmt: skip
    ref = tmp_path / "ref.raw"
    ref.write_bytes(pattern(0, SIZE))
    q = s.qemu(certs)
    run(["qemu-img", "compare", q[0], q[1], "--image-opts", f"driver=file,filename={ref}", q[3]])
    w = ["qemu-io", *q, "-c", "write -P 0x5a 65000 3000000", "-c", "flush"]
    run(w)
    run(["qemu-io", *q, "-c", "read -P 0x5a 65000 3000000"])
    if shutil.which("nbdcopy"):  # libnbd's TLS (GnuTLS), several connections
        out = tmp_path / "copy.raw"
        run(["nbdcopy", s.url(certs), str(out)])
        want = bytearray(pattern(0, SIZE))
        want[65000 : 65000 + 3000000] = b"\x5a" * 3000000
        assert out.read_bytes() == bytes(want)
    p = run(["qemu-img", "info", f"nbd://127.0.0.1:{s.port}/"], check=False)
    assert p.returncode != 0 and "TLS" in p.stderr, p
    run(["qemu-img", "info", *q[:2], "--image-opts", q[3]])  # the server is unharmed
    assert s.stop() == 0, s.err
    assert "Traceback" not in s.err and "internal error" not in s.err, s.err
    with vdisk.open(str(img), readonly=True) as d:
        assert d.read(65000, 3000000) == b"\x5a" * 3000000


def test_client_certificates_required_with_a_ca(tmp_path, certs, serve_tls):
    img = patterned(tmp_path / "a.vdisk")
    s = serve_tls(img, "--tls-cert", f"{certs}/server-cert.pem", "--tls-key",
                  f"{certs}/server-key.pem", "--tls-ca", f"{certs}/ca-cert.pem")  # fmt: skip
    run(["qemu-img", "info", *s.qemu(certs)[:2], "--image-opts", s.qemu(certs)[3]])
    anonymous = tmp_path / "anon"
    anonymous.mkdir()
    shutil.copy(certs / "ca-cert.pem", anonymous / "ca-cert.pem")  # trusts the server only
    q = s.qemu(anonymous)
    p = run(["qemu-img", "info", q[0], q[1], "--image-opts", q[3]], check=False)
    assert p.returncode != 0, p
    run(["qemu-img", "info", *s.qemu(certs)[:2], "--image-opts", s.qemu(certs)[3]])
    assert s.stop() == 0
    assert "TLS handshake failed" in s.err, s.err
    assert "Traceback" not in s.err, s.err


def test_tls_option_errors_are_one_line(tmp_path, certs):
    img = patterned(tmp_path / "a.vdisk")
    p = vdisk_cli("serve", str(img), "--tls-key", f"{certs}/server-key.pem", check=False)
    assert p.returncode == 2 and "need --tls-cert" in p.stderr, p
    p = vdisk_cli("serve", str(img), "--tls-cert", f"{certs}/server-cert.pem",
                  "--tls-key", f"{certs}/client-key.pem", check=False)  # fmt: skip
    assert p.returncode == 2 and "cannot load the certificate" in p.stderr, p
    enc = tmp_path / "enc-key.pem"  # a key with a passphrase: refused, never a prompt
    _openssl("pkey", "-in", f"{certs}/server-key.pem", "-aes256", "-passout", "pass:x",
             "-out", str(enc))  # fmt: skip
    p = vdisk_cli("serve", str(img), "--tls-cert", f"{certs}/server-cert.pem",
                  "--tls-key", str(enc), check=False, timeout=30)  # fmt: skip
    assert p.returncode == 2 and "private key is encrypted" in p.stderr, p
    p = vdisk_cli("serve", str(img), "--tls-cert", str(tmp_path / "missing.pem"), check=False)
    assert p.returncode == 2 and "missing.pem" in p.stderr, p
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr


def test_forced_tls_at_the_protocol_level(tmp_path, certs, serve_tls):
    """What proto.md asks of a server that requires TLS, seen from a raw socket."""
    opt_list, opt_export_name, opt_starttls, opt_go = 3, 1, 5, 7
    rep_ack, rep_err_invalid, rep_err_tls_reqd = 1, 2**31 + 3, 2**31 + 5
    img = patterned(tmp_path / "a.vdisk")
    s = serve_tls(img, "--tls-cert", f"{certs}/server-cert.pem", "--tls-key",
                  f"{certs}/server-key.pem")  # fmt: skip
    with RawClient(s.port) as c:
        assert c.option(opt_list)[-1][0] == rep_err_tls_reqd
        assert c.option(opt_go, b"\0" * 6)[-1][0] == rep_err_tls_reqd
        assert c.option(opt_starttls, b"x")[-1][0] == rep_err_invalid
        assert c.option(opt_starttls)[-1][0] == rep_ack
        ctx = ssl.create_default_context(cafile=str(certs / "ca-cert.pem"))
        c.sock = ctx.wrap_socket(c.sock, server_hostname="127.0.0.1")
        assert c.option(opt_starttls)[-1][0] == rep_err_invalid  # already in TLS
        size = c.go("", structured=True)
        assert size == SIZE
        c.send_request(0, 7, 3 * MiB + 5, 70000)  # READ, through TLS
        err, cookie, _typ, payload = c.reply()
        assert (err, cookie) == (0, 7) and payload[8:] == pattern(3 * MiB + 5, 70000)
    with RawClient(s.port) as c:  # STARTTLS, then no TLS at all: dropped
        assert c.option(opt_starttls)[-1][0] == rep_ack
        c.sock.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        with pytest.raises((EOFError, ConnectionError, socket.timeout)):
            c.recv(1)
    with RawClient(s.port) as c:  # EXPORT_NAME in the clear has no error reply: dropped
        c.sock.sendall(struct.pack(">QII", 0x49484156454F5054, opt_export_name, 0))
        with pytest.raises((EOFError, ConnectionError, socket.timeout)):
            c.recv(1)
    run(["qemu-img", "info", *s.qemu(certs)[:2], "--image-opts", s.qemu(certs)[3]])
    assert s.stop() == 0
    assert "TLS handshake failed" in s.err and "without TLS" in s.err, s.err
    assert "Traceback" not in s.err and "internal error" not in s.err, s.err
