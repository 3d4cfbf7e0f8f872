"""kill -9 of `vdisk serve` in the middle of a client's writes: every write acknowledged
before an acknowledged NBD_CMD_FLUSH, and every acknowledged FUA write, is in the image
afterwards, and the image opens and checks clean (leaked clusters allowed: a crash may
strand some).

The client is the raw socket one of test_nbd.py: it needs to know exactly which replies it
received before the server died, which a real client does not report."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

import vdisk
from tests.conftest import run
from tests.test_nbd import FLUSH, WRITE, RawClient, serve  # noqa: F401 (the fixture)

MiB = 1 << 20
SIZE = 16 * MiB
CHUNK = 65536
FUA = 1


def _block(k: int, n: int) -> bytes:
    """The bytes of the k-th write: its number in every 8-byte word."""
    return struct.pack("<Q", k) * (n // 8)


def _mismatch(got: bytes, model: bytearray, unsure: bytearray) -> int | None:
    """The first offset where ``got`` differs from ``model`` outside the unsure bytes."""
    for pos in range(0, SIZE, CHUNK):
        a, b, u = got[pos : pos + CHUNK], model[pos : pos + CHUNK], unsure[pos : pos + CHUNK]
        if a == b:
            continue
        if not any(u):
            return pos + next(i for i in range(len(a)) if a[i] != b[i])
        for i in range(len(a)):
            if a[i] != b[i] and not u[i]:
                return pos + i
    return None


@pytest.mark.parametrize("fmt", ["vdisk", "qcow2"])
def test_kill9_keeps_every_flushed_write(serve, tmp_path: Path, fmt: str) -> None:  # noqa: F811
    rng = random.Random(fmt)
    img = tmp_path / f"k.{fmt}"
    vdisk.create(str(img), SIZE, format=fmt)
    model = bytearray(SIZE)  # what the image must hold where ``unsure`` is 0
    k = 0
    for round_ in range(5):
        unsure = bytearray(SIZE)
        s = serve(img, args=("-f", fmt))
        since_flush: list[tuple[bool, int, bytes]] = []  # (durable?, offset, data) in order
        with RawClient(s.port) as c:
            c.go("", structured=False)
            pending: set[int] = set()
            for _ in range(rng.randint(30, 80)):
                k += 1
                n = rng.choice([4096, 12288, CHUNK, 200_000 // 8 * 8])
                off = rng.randrange(0, (SIZE - n) // 512) * 512
                data = _block(k, n)
                fua = not pending and rng.random() < 0.15
                c.send_request(WRITE, k, off, n, FUA if fua else 0, data)
                if fua:  # durable once acknowledged; nothing else was in flight
                    err, cookie, _t, _p = c.reply()
                    assert (err, cookie) == (0, k)
                    since_flush.append((True, off, data))
                    continue
                pending.add(k)
                since_flush.append((False, off, data))
                if rng.random() < 0.3:  # collect the replies, and sometimes flush
                    while pending:
                        err, cookie, _t, _p = c.reply()
                        assert err == 0 and cookie in pending
                        pending.discard(cookie)
                    if rng.random() < 0.5:
                        c.send_request(FLUSH, 1 << 62, 0, 0)
                        assert c.reply()[:2] == (0, 1 << 62)
                        for _d, o, b in since_flush:
                            model[o : o + len(b)] = b
                        since_flush.clear()
            s.proc.kill()  # writes in flight, replies unread
            s.proc.wait()
        s.stop()
        for durable, o, b in since_flush:  # in the order they were sent
            if durable:
                model[o : o + len(b)] = b
                unsure[o : o + len(b)] = bytes(len(b))
            else:
                unsure[o : o + len(b)] = b"\1" * len(b)
        with vdisk.open(str(img), readonly=True) as d:
            rep = d.check()
            assert rep.exit_code in (0, 3), rep
            got = d.read(0, SIZE)
        bad = _mismatch(got, model, unsure)
        assert bad is None, f"round {round_}: byte {bad} lost a write acknowledged as durable"
        model[:] = got  # what the unsure bytes came to, for the next round
    if fmt == "qcow2":
        p = run(["qemu-img", "check", str(img)], check=False)
        assert p.returncode in (0, 3), p.stdout + p.stderr
