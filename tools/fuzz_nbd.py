#!/usr/bin/env python3
"""Protocol fuzzer for `vdisk serve` (run by hand; tests/test_nbd.py runs it for seconds).

The standard (issue 7): a client that sends garbage or disconnects mid-request is dropped
with a log line, and nothing else is harmed. A live server on loopback serves a raw image
and a .vdisk, both made from a known pattern; batches of one to four concurrent
connections attack it at the handshake (junk, truncated and oversized options, unknown
ones, bogus info requests, missing or huge export names, options after GO, disconnects
at random points) and after a proper one (random commands, flags, offsets and lengths,
pipelining, writes cut short, bad magic, abandoning replies). Then a read-only server is
attacked the same way.

Every reply is checked against proto.md as it arrives (cookies, error values, structured
chunk framing and ranges, what must fail and what must succeed), reads against a model
of the image. After each batch a well-behaved client must still connect and read what
the model says (bytes whose fate is undecidable, such as trims or writes whose reply was
never read, are re-learnt), the server must be alive and its log free of tracebacks and
"internal error". A finding is saved under --out as a directory: what it is, the seed,
and the bytes each connection of the batch sent (``--replay FILE.bin`` sends one again
to a fresh server). The constants are written from proto.md, not imported from vdisk: a
mistake shared with the server would hide itself.

Usage::

    python tools/fuzz_nbd.py --seconds 300 --seed 1 --out fuzz-out
    python tools/fuzz_nbd.py --replay fuzz-out/003-hang/b12-t0-c1.bin
"""

from __future__ import annotations

import argparse
import array
import contextlib
import dataclasses
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
K, M = 1 << 10, 1 << 20
TIMEOUT = 10.0  # a server that takes longer than this to answer is hanging
EXPORTS = {"pattern.raw": 16 * M, "small.vdisk": 4 * M}

NBDMAGIC, IHAVEOPT, OPT_REPLY_MAGIC = 0x4E42444D41474943, 0x49484156454F5054, 0x3E889045565A9
REQ_MAGIC, SIMPLE_MAGIC, STRUCT_MAGIC = 0x25609513, 0x67446698, 0x668E33EF
OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS, OPT_INFO, OPT_GO = 1, 2, 3, 5, 6, 7
OPT_STRUCTURED, OPT_LIST_META, OPT_SET_META = 8, 9, 10
REP_ACK, REP_SERVER, REP_INFO, REP_META, REP_ERR = 1, 2, 3, 4, 1 << 31
READ, WRITE, DISC, FLUSH, TRIM, CACHE, ZEROES, BLOCK_STATUS = range(8)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
#: The flags proto.md documents for each command ("Request types"; FUA is valid on all).
CMD_FLAGS = {READ: FUA | DF, WRITE: FUA, DISC: FUA, FLUSH: FUA, TRIM: FUA, CACHE: FUA}
CMD_FLAGS |= {ZEROES: FUA | NO_HOLE | FAST_ZERO, BLOCK_STATUS: FUA | REQ_ONE}
WRITES = (WRITE, TRIM, ZEROES)
T_NONE, T_DATA, T_HOLE, T_STATUS, T_ERROR, T_ERROR_OFFSET = 0, 1, 2, 5, 2**15 + 1, 2**15 + 2
ERRORS = {1, 5, 12, 22, 28, 75, 95, 108}  # proto.md "Error values": no others may be sent
STATE_ZERO, MAX_PAYLOAD = 2, 32 * M
#: The server's log line that ends a connection (vdisk/nbd/server.py, _Connection.run).
FINISHED = re.compile(r"127\.0\.0\.1:(\d+): (?:disconnected|dropped)")
GREETING = struct.Struct(">QQH")
OPTION = struct.Struct(">QII")
OPT_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
CHUNK = struct.Struct(">HHQI")  # a structured chunk header after its magic


def pattern(offset: int, length: int, salt: int) -> bytes:
    """Every 8-byte word holds its own offset plus a per-image salt: misplaced data shows."""
    start = offset & ~7
    words = array.array("Q", range(start + salt, offset + length + salt + 8, 8)).tobytes()
    return words[offset - start : offset - start + length]


#: (offset, length) of the pattern in each image: the raw one ends in a 4 MiB hole.
LAYOUT = {
    "pattern.raw": (0, [(0, 12 * M)]),
    "small.vdisk": (1 << 48, [(60 * K, 200 * K), (M - 3 * K, 70 * K + 5), (4 * M - 6 * K, 6 * K)]),
}


def make_images(d: Path) -> dict[str, bytes]:
    """The images (through the vdisk API) and their content."""
    from vdisk import api

    content = {}
    for name, size in EXPORTS.items():
        api.create(str(d / name), size, format="raw" if name.endswith(".raw") else "vdisk")
        data = bytearray(size)
        salt, extents = LAYOUT[name]
        with api.open(str(d / name)) as disk:
            for off, n in extents:
                data[off : off + n] = pattern(off, n, salt)
                disk.write(off, data[off : off + n])
        content[name] = bytes(data)
    return content


class Model:
    """What an export must read back, with the bytes whose content is unknown (a trim, a
    write whose reply was never read) and those written during the current batch (where
    concurrent reads are not checked)."""

    def __init__(self, data: bytes) -> None:
        self.data = bytearray(data)
        self.unknown = bytearray(len(data))
        self.dirty = bytearray(len(data))

    def mismatch(self, off: int, got: bytes | bytearray, skip_dirty: bool) -> str | None:
        for a in range(off, off + len(got), 64 * K):
            b = min(a + 64 * K, off + len(got))
            if self.data[a:b] == got[a - off : b - off]:
                continue
            mask = bytes(self.unknown[a:b])
            if skip_dirty:
                mask = (int.from_bytes(mask) | int.from_bytes(self.dirty[a:b])).to_bytes(b - a)
            i = 0
            while 0 <= i < b - a:  # each run of bytes whose content is known
                j = mask.find(1, i)
                j = b - a if j < 0 else j
                if self.data[a + i : a + j] != got[a + i - off : a + j - off]:
                    k = next(k for k in range(a + i, a + j) if self.data[k] != got[k - off])
                    want, have = self.data[k : k + 8].hex(), bytes(got[k - off : k - off + 8]).hex()
                    return f"byte {k} reads {have}, expected {want}"
                i = mask.find(0, j)
        return None


class Closed(Exception):
    """The server closed the connection."""


class Bad(Exception):
    """A finding: the server broke the protocol or the standard."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


class Conn:
    """A client socket that records every byte it sends (the reproduction)."""

    def __init__(self, port: int, name: str) -> None:
        self.name, self.sent = name, bytearray()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.port = self.sock.getsockname()[1]  # how the server's log names this connection
        self.logged = True  # whether the server logs the end of this connection

    def send(self, data: bytes, record: bool = True) -> None:
        if record:
            self.sent += data
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed(str(e)) from None

    def recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.sock.recv(min(n - len(buf), M))
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed(f"closed after {len(buf)} of {n} bytes")
            buf += chunk
        return bytes(buf)

    def expect_close(self, why: str) -> None:
        """The server must close now (after DISC, an unknown EXPORT_NAME): anything else it
        sends, or silence until the timeout, is a finding."""
        try:
            extra = self.recv(1)
        except Closed:
            return
        except TimeoutError:
            raise Bad("hang", f"still open {TIMEOUT}s after {why}") from None
        raise Bad("protocol", f"sent {extra!r} after {why} instead of closing")


@dataclasses.dataclass
class Session:
    conn: Conn
    export: str
    size: int
    structured: bool
    ctx: int | None  # the base:allocation context id, if negotiated
    readonly: bool


@dataclasses.dataclass
class Req:
    cmd: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""
    must: bool | None = True  # True: must succeed, False: must fail, None: either
    may_drop: bool = False  # the request breaks a client MUST: the server may hang up
    err: int = 0
    chunks: int = 0
    ranges: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    pieces: list[tuple[int, bytes]] = dataclasses.field(default_factory=list)
    descs: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    data: bytes = b""

    def wire(self) -> bytes:
        head = REQUEST.pack(REQ_MAGIC, self.flags, self.cmd, self.cookie, self.offset, self.length)
        return head + self.payload


# -- the handshake -----------------------------------------------------------------------------


def greet(c: Conn, cflags: int = 3) -> None:
    magic, opt, flags = GREETING.unpack(c.recv(GREETING.size))
    if (magic, opt) != (NBDMAGIC, IHAVEOPT) or not flags & 1:
        raise Bad("protocol", f"greeting {magic:#x} {opt:#x} flags {flags:#x}")
    c.send(struct.pack(">I", cflags))


def option(c: Conn, opt: int, data: bytes) -> list[tuple[int, bytes]]:
    """Send one option and read its replies up to the final one, checking each."""
    c.send(OPTION.pack(IHAVEOPT, opt, len(data)) + data)
    replies = []
    while True:
        magic, o, rep, n = OPT_REPLY.unpack(c.recv(OPT_REPLY.size))
        if magic != OPT_REPLY_MAGIC or o != opt or n > 64 * K:
            raise Bad(
                "protocol", f"option reply {magic:#x} to option {o} of {n} bytes (sent {opt})"
            )
        payload = c.recv(n)
        ok = {
            REP_ACK: n == 0,
            REP_SERVER: opt == OPT_LIST and n >= 4 and struct.unpack(">I", payload[:4])[0] <= n - 4,
            REP_INFO: opt in (OPT_INFO, OPT_GO) and _info_ok(payload),
            REP_META: opt in (OPT_LIST_META, OPT_SET_META) and n > 4,
        }.get(rep, bool(rep & REP_ERR) and n <= 4096)
        if not ok:
            raise Bad(
                "protocol", f"reply type {rep:#x} of {n} bytes to option {opt}: {payload[:64]!r}"
            )
        replies.append((rep, payload))
        if rep == REP_ACK or rep & REP_ERR:
            return replies


def _info_ok(p: bytes) -> bool:
    if len(p) < 2:
        return False
    (kind,) = struct.unpack(">H", p[:2])
    if kind == 0:
        return len(p) == 12 and struct.unpack(">Q", p[2:10])[0] in EXPORTS.values()
    if kind == 3:
        if len(p) != 14:
            return False
        lo, pref, hi = struct.unpack(">III", p[2:])
        return lo <= pref <= hi and not lo & (lo - 1) and not pref & (pref - 1)
    return True


def meta_data(name: bytes, queries: list[bytes]) -> bytes:
    out = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
    return out + b"".join(struct.pack(">I", len(q)) + q for q in queries)


def go_data(name: bytes, infos: list[int]) -> bytes:
    head = struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
    return head + struct.pack(f">{len(infos)}H", *infos)


def negotiate(
    c: Conn, export: str, *, structured: bool, meta: bool, old: bool, readonly: bool
) -> Session:
    """A proper handshake (NBD_OPT_EXPORT_NAME if ``old``, else NBD_OPT_GO)."""
    greet(c)
    ctx = None
    name = export.encode()
    if structured and option(c, OPT_STRUCTURED, b"")[-1][0] != REP_ACK:
        raise Bad("valid-request-failed", "NBD_OPT_STRUCTURED_REPLY refused")
    if meta:
        replies = option(c, OPT_SET_META, meta_data(name, [b"base:allocation"]))
        ids = [struct.unpack(">I", p[:4])[0] for rep, p in replies if rep == REP_META]
        if replies[-1][0] != REP_ACK or len(ids) != 1:
            raise Bad("valid-request-failed", f"SET_META_CONTEXT base:allocation: {replies}")
        ctx = ids[0]
    if old:
        c.send(OPTION.pack(IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
        size, tflags = struct.unpack(">QH", c.recv(10))
    else:
        replies = option(c, OPT_GO, go_data(name, []))
        infos = [p for rep, p in replies if rep == REP_INFO and p[:2] == b"\0\0"]
        if replies[-1][0] != REP_ACK or len(infos) != 1:
            raise Bad("valid-request-failed", f"NBD_OPT_GO of {export}: {replies}")
        size, tflags = struct.unpack(">QH", infos[0][2:])
    if size != EXPORTS[export] or bool(tflags & 2) != readonly or not tflags & 1:
        raise Bad("protocol", f"{export}: size {size}, transmission flags {tflags:#x}")
    return Session(c, export, size, structured, ctx, readonly)


# -- transmission ------------------------------------------------------------------------------

ODD_LENGTHS = [0, 1, 511, 4095, 4096, 65535, 65537, M, 16 * M, MAX_PAYLOAD, MAX_PAYLOAD + 1]
ODD_LENGTHS += [2**31, 2**32 - 1]


def gen_request(rng: random.Random, s: Session, cookie: int, max_write: int = M) -> Req:
    cmds = [READ, WRITE, TRIM, ZEROES, FLUSH, CACHE, BLOCK_STATUS, -1]
    cmd = rng.choices(cmds, weights=[30, 20, 6, 8, 4, 4, 12, 3])[0]
    if cmd < 0:
        cmd = rng.choice([8, 9, 42, 0xFFFF, rng.getrandbits(16)])
    if rng.random() < 0.15:
        flags = rng.getrandbits(16)
    else:
        flags = CMD_FLAGS.get(cmd, 0) & rng.getrandbits(5) & ~(0 if s.structured else DF)
    if rng.random() < 0.65:  # in range: where the data is checked
        length = rng.choice([rng.randint(1, 4096), rng.randint(1, 300 * K), 4096, 64 * K])
        offset = rng.randrange(0, s.size - length + 1)
        if rng.random() < 0.3:
            offset -= offset % 4096
    else:  # at and past the edges
        size = s.size
        offset = rng.choice([0, 1, size - 1, size, size + 1, size - 4096, 2**63, 2**64 - 1])
        offset = rng.choice([offset, rng.getrandbits(64), rng.randrange(size)])
        length = rng.choice([*ODD_LENGTHS, rng.getrandbits(32), rng.randrange(1, 2 * M)])
    if cmd == FLUSH and rng.random() < 0.7:
        offset = length = 0
    if cmd == WRITE and length > max_write:
        length = rng.randint(0, max_write)
    r = Req(cmd, flags, cookie, offset, length, rng.randbytes(length) if cmd == WRITE else b"")
    r.must, r.may_drop = expect(s, r)
    return r


def expect(s: Session, r: Req) -> tuple[bool | None, bool]:
    """(must succeed / must fail / None: either, whether the server may hang up), by proto.md."""
    allowed = CMD_FLAGS.get(r.cmd)
    if allowed is None:
        return False, False  # "SHOULD return NBD_EINVAL if it receives an unknown command"
    if r.cmd == FLUSH:
        return (True, False) if not (r.offset or r.length or r.flags & ~allowed) else (None, True)
    if s.readonly and r.cmd in WRITES:
        return False, r.cmd != WRITE  # TRIM and WRITE_ZEROES are not even advertised
    if r.cmd == BLOCK_STATUS and s.ctx is None:
        return False, True
    if r.offset + r.length > s.size:
        return False, False
    if r.length > MAX_PAYLOAD and r.cmd in (READ, WRITE):
        return None, True
    if r.flags & ~allowed or (r.flags & DF and not s.structured):
        return None, True
    if r.length == 0 or (r.cmd == ZEROES and r.flags & FAST_ZERO):
        return None, False
    return True, False


def read_reply(s: Session, pending: dict[int, Req]) -> Req:
    """Read messages until one request's reply is complete, checking each on the way."""
    c = s.conn
    while True:
        try:
            (magic,) = struct.unpack(">I", c.recv(4))
        except TimeoutError:
            if started := [x for x in pending.values() if x.chunks]:
                x = started[0]
                raise Bad(
                    "protocol", f"{x.chunks} chunks to cookie {x.cookie:#x}, none DONE"
                ) from None
            raise
        if magic == SIMPLE_MAGIC:
            err, cookie = struct.unpack(">IQ", c.recv(12))
            r = pending.pop(cookie, None)
            if r is None or r.chunks:
                raise Bad("protocol", f"simple reply with cookie {cookie:#x}, not in flight")
            if s.structured and r.cmd == READ:
                raise Bad("protocol", "simple reply to READ after structured replies were agreed")
            if err and err not in ERRORS:
                raise Bad("protocol", f"error value {err} is not one proto.md defines")
            if r.cmd == READ and not err:
                if r.offset + r.length > s.size or r.length > MAX_PAYLOAD:
                    raise Bad("should-have-failed", f"READ {r.offset}+{r.length}: error 0")
                r.data = c.recv(r.length)
            r.err = err
            return r
        if magic != STRUCT_MAGIC:
            raise Bad("protocol", f"reply magic {magic:#x}")
        if not s.structured:
            raise Bad("protocol", "structured reply without NBD_OPT_STRUCTURED_REPLY")
        flags, typ, cookie, n = CHUNK.unpack(c.recv(CHUNK.size))
        q = pending.get(cookie)
        if q is None or n > MAX_PAYLOAD + 64:
            raise Bad("protocol", f"chunk type {typ} of {n} bytes with cookie {cookie:#x}")
        q.chunks += 1
        check_chunk(s, q, typ, flags, c.recv(n))
        if flags & 1:  # NBD_REPLY_FLAG_DONE
            del pending[cookie]
            if not q.err and q.cmd == READ:
                if sum(b - a for a, b in q.ranges) != q.length:
                    raise Bad("protocol", f"READ {q.offset}+{q.length} answered by {q.ranges}")
                buf = bytearray(q.length)
                for off, piece in q.pieces:
                    buf[off - q.offset : off - q.offset + len(piece)] = piece
                q.data = bytes(buf)
            if not q.err and q.cmd == BLOCK_STATUS and not q.descs:
                raise Bad("protocol", "successful BLOCK_STATUS without a status chunk")
            return q


def check_chunk(s: Session, r: Req, typ: int, flags: int, p: bytes) -> None:
    end, n = r.offset + r.length, len(p)
    if typ & 0x8000:
        tail = 8 if typ == T_ERROR_OFFSET else 0
        err, mlen = struct.unpack(">IH", p[:6]) if n >= 6 else (0, 0)
        if err not in ERRORS or mlen > n - 6 - tail or mlen > 4096:
            raise Bad("protocol", f"error chunk {typ:#x}: error {err}, message {mlen} of {n}")
        if typ == T_ERROR_OFFSET:
            (eoff,) = struct.unpack(">Q", p[6 + mlen : 14 + mlen])
            if not r.offset <= eoff < end or r.cmd in (FLUSH, DISC):
                raise Bad("protocol", f"ERROR_OFFSET {eoff} outside {r.offset}+{r.length}")
        r.err = r.err or err
    elif typ == T_NONE:
        if n or not flags & 1:
            raise Bad("protocol", f"NONE chunk of {n} bytes, flags {flags:#x}")
    elif typ in (T_DATA, T_HOLE):
        if r.cmd != READ or n < 9 or (typ == T_HOLE and n != 12):
            raise Bad("protocol", f"content chunk {typ} of {n} bytes to command {r.cmd}")
        (off,) = struct.unpack(">Q", p[:8])
        ln = n - 8 if typ == T_DATA else struct.unpack(">I", p[8:])[0]
        if ln == 0 or off < r.offset or off + ln > end:
            raise Bad("protocol", f"chunk {off}+{ln} outside the request {r.offset}+{r.length}")
        if any(off < b and a < off + ln for a, b in r.ranges):
            raise Bad("protocol", f"chunk {off}+{ln} overlaps an earlier one: {r.ranges}")
        if r.flags & DF and r.ranges:
            raise Bad("protocol", "a READ with NBD_CMD_FLAG_DF answered in fragments")
        r.ranges.append((off, off + ln))
        r.pieces.append((off, p[8:] if typ == T_DATA else bytes(ln)))
    elif typ == T_STATUS:
        if r.cmd != BLOCK_STATUS or n < 12 or (n - 4) % 8 or r.descs:
            raise Bad("protocol", f"BLOCK_STATUS chunk of {n} bytes to command {r.cmd}")
        (ctx,) = struct.unpack(">I", p[:4])
        descs = [(a, b) for a, b in struct.iter_unpack(">II", p[4:])]
        lengths = [d[0] for d in descs]
        one = r.flags & REQ_ONE and (len(descs) != 1 or lengths[0] > r.length)
        if ctx != s.ctx or 0 in lengths or one or sum(lengths[:-1]) >= r.length:
            raise Bad("protocol", f"BLOCK_STATUS {r.offset}+{r.length}: context {ctx}, {descs[:8]}")
        if r.offset + sum(lengths) > s.size:
            raise Bad("protocol", f"BLOCK_STATUS {r.offset}+{r.length} extends past the end")
        r.descs = descs
    else:
        raise Bad("protocol", f"chunk of unknown type {typ}")


class Batch:
    """One round of concurrent connections: what they sent, what may have been written."""

    def __init__(self, index: int, models: dict[str, Model]) -> None:
        self.index, self.models = index, models
        self.conns: list[Conn] = []
        self.ops: list[tuple[str, int, int, bytes | None]] = []  # None: content unknown
        self.findings: list[tuple[str, str, list[Conn]]] = []
        self.requests = 0
        self.lock = threading.Lock()

    def sent(self, s: Session, r: Req) -> None:
        with self.lock:
            self.requests += 1
        if r.cmd in WRITES and r.must is not False:
            a, b = r.offset, min(r.offset + r.length, s.size)
            if a < b:
                self.models[s.export].dirty[a:b] = b"\1" * (b - a)

    def judge(self, s: Session, r: Req) -> None:
        """The outcome of a request against what proto.md and the model say."""
        what = f"cmd {r.cmd} flags {r.flags:#x} at {r.offset}+{r.length} on {s.export}"
        if r.must is False and not r.err:
            raise Bad("should-have-failed", f"{what}{' (read-only)' if s.readonly else ''}")
        if r.must and r.err:
            raise Bad("valid-request-failed", f"{what}: error {r.err}")
        m = self.models[s.export]
        if r.err:
            return
        if r.cmd == READ and r.length and (bad := m.mismatch(r.offset, r.data, True)):
            raise Bad("wrong-data", f"{what}: {bad}")
        if r.cmd == BLOCK_STATUS:
            off = r.offset
            for n, state in r.descs:
                a, b = off, min(off + n, s.size)
                clean = m.dirty.find(1, a, b) < 0 and m.unknown.find(1, a, b) < 0
                if state & STATE_ZERO and clean and m.data.count(0, a, b) != b - a:
                    raise Bad("wrong-data", f"{what}: {a}+{n} said to read as zeroes")
                off += n
        if r.cmd in WRITES:
            n = min(r.length, s.size - r.offset)
            content = r.payload if r.cmd == WRITE else bytes(n) if r.cmd == ZEROES else None
            self.ops.append((s.export, r.offset, n, content))

    def unanswered(self, s: Session, pending: dict[int, Req]) -> None:
        """Writes sent whole whose reply never came may or may not have happened."""
        for r in pending.values():
            if r.cmd in WRITES and r.must is not False:
                self.ops.append((s.export, r.offset, min(r.length, s.size - r.offset), None))


def transmission_case(rng: random.Random, c: Conn, b: Batch, readonly: bool) -> None:
    export = rng.choice(list(EXPORTS))
    structured = rng.random() < 0.7
    meta = structured and rng.random() < 0.7
    old = not structured and rng.random() < 0.3
    s = negotiate(c, export, structured=structured, meta=meta, old=old, readonly=readonly)
    mode = rng.choice(["sequential", "sequential", "pipelined", "abandon", "short", "garbage"])
    count = rng.randint(1, 200 if mode == "abandon" else 30)  # over 64: past the server's queue
    cookies = dict.fromkeys(rng.choice([k, rng.getrandbits(64)]) for k in range(count))
    reqs = [gen_request(rng, s, k) for k in cookies]
    pending: dict[int, Req] = {}
    try:
        if mode in ("pipelined", "abandon"):
            stream = b"".join(r.wire() for r in reqs)
            pending = {r.cookie: r for r in reqs}
            for r in reqs:
                b.sent(s, r)
            c.sent += stream
            cuts = sorted(rng.sample(range(len(stream)), min(len(stream), 8)))

            def pour() -> None:  # a thread: the replies must be read while the requests go
                try:
                    for x, y in zip([0, *cuts], [*cuts, len(stream)]):
                        c.send(stream[x:y], record=False)
                except (Closed, OSError):
                    pass

            t = threading.Thread(target=pour, daemon=True)
            t.start()
            if mode == "abandon":  # hang up without reading a reply: by FIN or by RST
                time.sleep(rng.random() / 50)
                with contextlib.suppress(OSError):  # the server may have hung up already
                    if rng.random() < 0.5:
                        linger = struct.pack("ii", 1, 0)
                        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                    c.sock.shutdown(socket.SHUT_RDWR)  # also wakes the sender
                t.join(TIMEOUT)
                return
            while pending:
                b.judge(s, read_reply(s, pending))
            t.join(TIMEOUT)
        else:
            for r in reqs:
                pending[r.cookie] = r
                b.sent(s, r)
                c.send(r.wire())
                b.judge(s, read_reply(s, pending))
        if mode == "short":  # a WRITE cut short, then gone: nothing may be written
            n = rng.choice([rng.randint(1, 64 * K), MAX_PAYLOAD + 1, 2**32 - 1])
            head = REQUEST.pack(REQ_MAGIC, 0, WRITE, 1, rng.randrange(s.size), n)
            c.send(head + rng.randbytes(rng.randint(0, min(n - 1, 64 * K))))
            with b.lock:
                b.requests += 1
        elif mode == "garbage":  # bad magic, an option after GO, or noise: the server hangs up
            junk = [
                rng.randbytes(28),
                OPTION.pack(IHAVEOPT, OPT_LIST, 0) * 2,
                b"\x25\x60\x95\x14" * 7,
            ]
            c.send(rng.choice(junk))
            c.expect_close("a request with a bad magic")
        elif rng.random() < 0.5:
            c.send(REQUEST.pack(REQ_MAGIC, 0, DISC, 0, 0, 0))
            c.expect_close("NBD_CMD_DISC")
    except Closed:
        if not any(r.may_drop for r in pending.values()):
            raise Bad(
                "dropped", f"the server hung up with {len(pending)} requests in flight"
            ) from None
    finally:
        b.unanswered(s, pending)


OPTION_KINDS = ["list", "structured", "meta", "meta", "info", "go", "go", "junk", "unknown"]
OPTION_KINDS += ["starttls", "abort", "export", "huge", "cut", "magic"]


def handshake_case(rng: random.Random, c: Conn, b: Batch, readonly: bool) -> None:
    """Options good and bad in random order; disconnects at random points."""
    cflags = rng.choice([3, 3, 3, 3, 1, 0, rng.getrandbits(32)])
    greet(c, cflags)
    if cflags & ~3:
        c.expect_close(f"client flags {cflags:#x}")
        return
    structured = False
    names = [n.encode() for n in EXPORTS]
    for _ in range(rng.randint(1, 12)):
        with b.lock:
            b.requests += 1
        name = rng.choice(
            [*names, *names, b"", b"nope", b"\xff\xfe", b"x" * rng.randint(4097, 60000)]
        )
        valid_name = name in names
        junk = rng.randbytes(rng.randint(1, 64))
        queries = [rng.choice([b"base:allocation", b"base:", b"x:y", junk]) for _ in range(3)]
        queries = queries[: rng.randint(0, 3)]
        infos = [rng.choice([0, 1, 2, 3, rng.getrandbits(16)]) for _ in range(rng.randint(0, 4))]
        kind = rng.choice(OPTION_KINDS)
        opt, data, must, may_drop = {
            "list": (OPT_LIST, rng.choice([b"", b"", junk]), None, False),
            "structured": (OPT_STRUCTURED, rng.choice([b"", b"", junk]), None, False),
            "meta": (
                rng.choice([OPT_LIST_META, OPT_SET_META]),
                meta_data(name, queries),
                None,
                False,
            ),
            "info": (OPT_INFO, go_data(name, infos), valid_name, len(name) > 4096),
            "go": (OPT_GO, go_data(name, infos), valid_name, len(name) > 4096),
            "junk": (rng.choice([OPT_INFO, OPT_GO, OPT_SET_META, OPT_LIST_META]), junk, None, True),
            "unknown": (
                rng.choice([0, 4, 12, 13, 0xFFFF, 2**31, rng.getrandbits(32)]),
                junk,
                False,
                False,
            ),
            "starttls": (OPT_STARTTLS, b"", False, False),
            "abort": (OPT_ABORT, b"", None, True),
        }.get(kind, (0, b"", None, True))
        if kind == "list" and not data:
            must = True
        if kind in ("structured", "list") and data:
            must = False
        if kind == "meta" and not structured:
            must = False
        if kind in ("export", "huge", "cut", "magic"):
            handshake_end(rng, c, kind, name, readonly, cflags)
            return
        try:
            replies = option(c, opt, data)
        except Closed:
            if may_drop:
                return
            raise Bad("dropped", f"hung up on option {opt} ({kind}) of {len(data)} bytes") from None
        final = replies[-1][0]
        if (must and final != REP_ACK) or (must is False and not final & REP_ERR):
            raise Bad("should-have-failed" if must is False else "valid-request-failed",
                      f"option {opt} ({kind}, {len(data)} bytes): final reply {final:#x}")  # fmt: skip
        if kind == "list" and final == REP_ACK:
            listed = {p[4:] for rep, p in replies if rep == REP_SERVER}
            if listed != set(names):
                raise Bad("protocol", f"NBD_OPT_LIST lists {listed}")
        structured |= kind == "structured" and final == REP_ACK
        if kind == "abort":
            if final == REP_ACK:
                c.logged = False  # vdisk logs nothing for a soft disconnect in the handshake
                c.expect_close("NBD_OPT_ABORT")
            return
        if kind == "go" and final == REP_ACK:  # transmission: one checked read, or options
            if rng.random() < 0.5:
                c.send(OPTION.pack(IHAVEOPT, OPT_LIST, 0) * 2)
                c.expect_close("options after NBD_OPT_GO")
                return
            s = Session(c, name.decode(), EXPORTS[name.decode()], structured, None, readonly)
            r = Req(READ, 0, 7, rng.randrange(s.size - 4096), 4096)
            c.send(r.wire())
            b.judge(s, read_reply(s, {7: r}))
            return


def handshake_end(
    rng: random.Random, c: Conn, kind: str, name: bytes, ro: bool, cflags: int
) -> None:
    """The ways out of the handshake other than GO and ABORT."""
    if kind == "export":  # the old way in: an unknown name must be a hard disconnect
        c.send(OPTION.pack(IHAVEOPT, OPT_EXPORT_NAME, len(name)) + name)
        if name not in [n.encode() for n in EXPORTS]:
            c.expect_close(f"NBD_OPT_EXPORT_NAME {name[:20]!r}")
            return
        size, tflags = struct.unpack(">QH", c.recv(10))
        if cflags & 2 == 0 and c.recv(124) != bytes(124):
            raise Bad("protocol", "NBD_OPT_EXPORT_NAME reply without its 124 zero bytes")
        if size != EXPORTS[name.decode()] or bool(tflags & 2) != ro:
            raise Bad("protocol", f"EXPORT_NAME: size {size}, flags {tflags:#x}")
    elif kind == "huge":  # an option length past any sane limit, some data, then gone
        c.send(OPTION.pack(IHAVEOPT, rng.choice([OPT_GO, 99]), rng.randint(64 * K + 1, 2**32 - 1)))
        try:
            c.send(rng.randbytes(rng.randint(0, 4096)))
        except Closed:
            pass  # the server may hang up at once
    elif kind == "cut":  # disconnect in the middle of an option
        whole = OPTION.pack(IHAVEOPT, OPT_GO, 6 + len(name)) + go_data(name, [])
        c.send(whole[: rng.randrange(1, len(whole))])
    else:  # bad option magic: the server hangs up
        c.send(OPTION.pack(rng.getrandbits(64), OPT_LIST, 0))
        c.expect_close("an option with a bad magic")


# -- the server and the loop -------------------------------------------------------------------


class Server:
    """`vdisk serve` of the images on a free port; its log (and stderr) go to files."""

    def __init__(self, d: Path, readonly: bool) -> None:
        self.readonly = readonly
        self.log = d / f"serve-{time.monotonic_ns()}.log"
        self.err = self.log.with_suffix(".stderr")
        pid = self.log.with_suffix(".pid")
        cmd = [sys.executable, "-m", "vdisk", "serve", *(str(d / n) for n in EXPORTS)]
        cmd += ["--port", "0", "--pid-file", str(pid), "--log", str(self.log), "-v"]
        cmd += ["--read-only"] if readonly else []
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.err, "wb") as err:  # start_new_session: our Ctrl-C is ours to handle
            self.proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, env=env, start_new_session=True
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if "nbd://127.0.0.1:" not in line:
            self.stop()
            raise RuntimeError(f"vdisk serve did not start: {line}{self.err.read_text()}")
        self.port = int(line.split("nbd://127.0.0.1:")[1].split("/")[0])
        self.seen = [0, 0]
        self.finished: Counter[int] = Counter()  # client ports whose connection has ended

    def new_log(self) -> str:
        """What the log and stderr gained since the last call; notes connections that ended."""
        new = ""
        for k, path in enumerate((self.log, self.err)):
            with open(path, "rb") as f:
                f.seek(self.seen[k])
                raw = f.read()
            raw = raw[: raw.rfind(b"\n") + 1]  # whole lines only
            self.seen[k] += len(raw)
            new += raw.decode(errors="replace")
        self.finished.update(int(p) for p in FINISHED.findall(new))
        return new

    def wait_finished(self, conns: list[Conn]) -> tuple[list[Conn], str]:
        """Wait until the server's log says each connection ended (every request it
        started has run): (those that did not within the timeout, the log meanwhile)."""
        log, deadline = "", time.monotonic() + TIMEOUT
        while True:
            log += self.new_log()
            left = []
            for c in conns:
                if self.finished[c.port] > 0:
                    self.finished[c.port] -= 1
                else:
                    left.append(c)
            conns = left
            if not conns or time.monotonic() > deadline or self.proc.poll() is not None:
                return conns, log
            time.sleep(0.01)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


@dataclasses.dataclass
class Summary:
    requests: int = 0
    connections: int = 0
    batches: int = 0
    findings: list[str] = dataclasses.field(default_factory=list)


class Fuzzer:
    def __init__(self, d: Path, out: Path, seed: int, content: dict[str, bytes]) -> None:
        self.d, self.out, self.seed = d, out, seed
        self.models = {n: Model(data) for n, data in content.items()}
        self.summary = Summary()

    def run(self, seconds: float, readonly: bool, handshake: bool, jobs: int) -> None:
        """Batches against one server until the time is up; then the images must hold
        what the model says (written) or be unchanged (read-only)."""
        digests = {n: hashlib.sha256((self.d / n).read_bytes()).hexdigest() for n in EXPORTS}
        self.server = Server(self.d, readonly)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.batch(readonly, handshake, jobs)
        finally:
            code = self.server.stop()
        log = self.server.new_log()
        if code != 0 or "Traceback" in log or "internal error" in log:
            self.report("exit", f"vdisk serve exited {code}; log:\n{log[-3000:]}", [])
        from vdisk import api

        for name, m in self.models.items():
            with api.open(str(self.d / name), readonly=True) as disk:
                if bad := m.mismatch(0, disk.read(0, disk.size), False):
                    self.report("content", f"{name} after the server stopped: {bad}", [])
            digest = hashlib.sha256((self.d / name).read_bytes()).hexdigest()
            if readonly and digest != digests[name]:
                self.report("content", f"{name} changed under a read-only server", [])

    def batch(self, readonly: bool, handshake: bool, jobs: int) -> None:
        b = Batch(self.summary.batches, self.models)
        self.summary.batches += 1
        threads = []
        for k in range(random.Random(f"{self.seed}/{b.index}").randint(1, jobs)):
            rng = random.Random(f"{self.seed}/{b.index}/{k}")
            t = threading.Thread(target=self.worker, args=(rng, b, k, readonly, handshake))
            t.daemon = True
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
        self.summary.requests += b.requests
        self.summary.connections += len(b.conns)
        for kind, detail, conns in b.findings:
            self.report(kind, detail, conns)
        self.check(b)

    def worker(self, rng: random.Random, b: Batch, k: int, ro: bool, handshake: bool) -> None:
        for i in range(rng.randint(1, 4)):
            case: Callable[..., None] = transmission_case
            if handshake and rng.random() < 0.3:
                case = handshake_case
            try:
                c = Conn(self.server.port, f"b{b.index}-t{k}-c{i}")
            except OSError as e:
                b.findings.append(("connect", f"cannot connect: {e}", []))
                return
            b.conns.append(c)
            try:
                case(rng, c, b, ro)
            except Bad as e:
                b.findings.append((e.kind, f"{c.name}: {e.detail}", [c]))
            except Closed as e:
                b.findings.append(("dropped", f"{c.name}: hung up unexpectedly: {e}", [c]))
            except TimeoutError:
                b.findings.append(("hang", f"{c.name}: no answer within {TIMEOUT}s", [c]))
            finally:
                c.sock.close()

    def check(self, b: Batch) -> None:
        """After a batch: apply what was written, then the server must be alive, its log
        clean, and a well-behaved client must read what the model says."""
        for m in self.models.values():
            m.dirty[:] = bytes(len(m.dirty))
        touched = {n: bytearray(size) for n, size in EXPORTS.items()}
        for name, off, n, content in b.ops:
            m, t = self.models[name], touched[name]
            if n > 0:  # requests in flight together may run in any order: overlaps are unknown
                if content is None or t.find(1, off, off + n) >= 0:
                    m.unknown[off : off + n] = b"\1" * n
                else:
                    m.data[off : off + n] = content[:n]
                t[off : off + n] = b"\1" * n
        left, log = self.server.wait_finished([c for c in b.conns if c.logged])
        if self.server.proc.poll() is not None:
            tail = log[-3000:] + self.server.new_log()[-3000:]
            self.report("server-died", f"exit {self.server.proc.returncode}\n{tail}", b.conns)
            self.restart()
            return
        if left:
            names = ", ".join(c.name for c in left)
            self.report("lingering", f"no end of {names} in the log {TIMEOUT}s after", left)
        for marker in ("Traceback", "internal error"):
            if marker in log:
                i = log.index(marker)
                self.report("log", log[max(0, i - 2000) : i + 3000], b.conns)
                break
        try:
            self.verify(b)
        except Bad as e:
            self.report(e.kind, f"well-behaved client: {e.detail}", b.conns)
        except (Closed, OSError) as e:  # TimeoutError is an OSError
            kind = "hang" if isinstance(e, TimeoutError) else "well-behaved-client"
            self.report(kind, f"well-behaved client: {type(e).__name__}: {e}", b.conns)
            self.restart()

    def verify(self, b: Batch) -> None:
        readonly = self.server.readonly
        for name, m in self.models.items():
            c = Conn(self.server.port, f"verify-{name}")
            try:
                s = negotiate(c, name, structured=True, meta=True, old=False, readonly=readonly)
                got = bytearray()
                for k, off in enumerate(range(0, s.size, M)):
                    r = Req(READ, 0, k, off, min(M, s.size - off))
                    c.send(r.wire())
                    got += read_reply(s, {k: r}).data
                    if r.err:
                        raise Bad("valid-request-failed", f"{name}: READ {off}: error {r.err}")
                off = 0
                while off < s.size:
                    r = Req(BLOCK_STATUS, 0, 1 << 63, off, s.size - off)
                    c.send(r.wire())
                    read_reply(s, {r.cookie: r})
                    if r.err:
                        raise Bad("valid-request-failed", f"{name}: BLOCK_STATUS: error {r.err}")
                    for n, state in r.descs:
                        if state & STATE_ZERO and got.count(0, off, off + n) != n:
                            raise Bad("wrong-data", f"{name}: {off}+{n} said to read as zeroes")
                        off += n
                c.send(REQUEST.pack(REQ_MAGIC, 0, DISC, 0, 0, 0))
                c.expect_close("NBD_CMD_DISC")
                self.server.wait_finished([c])
                bad = m.mismatch(0, got, False)
                m.data[:], m.unknown[:] = got, bytes(len(got))  # re-learn what was unknown
                if bad:
                    raise Bad("content", f"{name}: {bad}")
            finally:
                c.sock.close()

    def restart(self) -> None:
        self.server.stop()
        self.server = Server(self.d, self.server.readonly)
        for m in self.models.values():
            m.unknown[:] = b"\1" * len(m.unknown)

    def report(self, kind: str, detail: str, conns: list[Conn]) -> None:
        n = len(self.summary.findings) + 1
        d = self.out / f"{n:03d}-{kind}"
        d.mkdir(parents=True, exist_ok=True)
        head = f"{kind}: {detail}\nseed {self.seed}, batch {self.summary.batches - 1}\n"
        files = "\n".join(f"  {c.name}.bin: {len(c.sent)} bytes" for c in conns)
        (d / "finding.txt").write_text(f"{head}connections of the batch (bytes sent):\n{files}\n")
        for c in conns:
            (d / f"{c.name}.bin").write_bytes(bytes(c.sent))
        self.summary.findings.append(f"{kind}: {detail[:300]}")
        print(f"FINDING {n}: {kind}: {detail[:500]}", flush=True)


def fuzz(seconds: float, seed: int, out: Path, *, handshake: bool = True, readonly: bool = True,
         jobs: int = 4) -> Summary:  # fmt: skip
    """Fuzz a written server for 2/3 of the time, then a read-only one; one at a time."""
    d = Path(tempfile.mkdtemp(prefix="fuzz-nbd-"))
    try:
        f = Fuzzer(d, out, seed, make_images(d))
        f.run(seconds * (2 / 3 if readonly else 1), False, handshake, jobs)
        if readonly:
            f.run(seconds / 3, True, handshake, jobs)
        return f.summary
    finally:
        shutil.rmtree(d, ignore_errors=True)


def replay(path: Path, readonly: bool) -> int:
    """Send a saved connection's bytes to a fresh server; then the usual checks."""
    d = Path(tempfile.mkdtemp(prefix="fuzz-nbd-"))
    try:
        f = Fuzzer(d, Path(tempfile.mkdtemp(dir=d)), 0, make_images(d))
        f.server = Server(d, readonly)
        c = Conn(f.server.port, "replay")
        c.recv(GREETING.size)
        try:
            c.send(path.read_bytes())
            c.sock.settimeout(2)
            while c.sock.recv(M):
                pass
        except (Closed, OSError):
            pass
        c.sock.close()
        time.sleep(1)
        for m in f.models.values():  # a replayed write is no finding: re-learn the content
            m.unknown[:] = b"\1" * len(m.unknown)
        f.check(Batch(0, f.models))
        f.server.stop()
        print(f.server.log.read_text()[-3000:] or "(empty log)")
        print("\n".join(f.summary.findings) or "no findings")
        return 1 if f.summary.findings else 0
    finally:
        shutil.rmtree(d, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("fuzz-out"))
    ap.add_argument("--jobs", type=int, default=4, help="most connections at once")
    ap.add_argument("--replay", type=Path, help="send this saved .bin to a fresh server")
    ap.add_argument("--read-only", action="store_true", help="(--replay) a read-only server")
    a = ap.parse_args()
    if a.replay:
        return replay(a.replay, a.read_only)
    seed = a.seed if a.seed is not None else random.randrange(1 << 32)
    print(f"seed {seed}, {a.seconds:g} s", flush=True)
    t0 = time.monotonic()
    try:
        s = fuzz(a.seconds, seed, a.out, jobs=a.jobs)
    except KeyboardInterrupt:
        print("interrupted")
        return 130
    print(f"{time.monotonic() - t0:.0f} s: {s.requests} requests, {s.connections} connections, "
          f"{s.batches} batches, {len(s.findings)} findings")  # fmt: skip
    for line in s.findings:
        print("  " + line.splitlines()[0])
    return 1 if s.findings else 0


if __name__ == "__main__":
    sys.exit(main())
