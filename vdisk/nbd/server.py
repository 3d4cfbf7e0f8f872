"""The NBD server: serves :class:`vdisk.api.Disk` objects to NBD clients over TCP (trio).

It translates and holds no format logic: ``NBD_CMD_READ`` becomes ``disk.read``,
``NBD_CMD_FLUSH`` ``disk.flush`` and so on; vdisk errors become NBD error values in one
place (:func:`_error_of`). Structure, after trio's ``serve_listeners``:

- one nursery owns everything: the listeners, one task per connection, a periodic
  commit task (``disk.flush_if_due``);
- a connection's receive loop parses requests as they come and keeps several in flight:
  a small request whose disk is free and fast runs inline on the event loop (a thread
  hop costs more than a cache hit, PERFORMANCE.md); the others (large, FUA, FLUSH, or a
  disk that is busy or slow) run in worker threads under one CapacityLimiter;
- replies of one connection are serialised by a lock, in completion order (NBD allows
  any order); the number of requests in flight per connection is bounded.

One :class:`Disk` is shared by every connection of an export: it is thread-safe and its
flush is global, so ``NBD_FLAG_CAN_MULTI_CONN`` is advertised.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from vdisk import runtime
from vdisk.errors import VdiskError, describe
from vdisk.formats.base import Driver, Kind
from vdisk.nbd import protocol as P

log = logging.getLogger("vdisk.nbd")

#: Worker threads for disk calls, shared by all connections (Disk calls serialise anyway).
DEFAULT_THREADS = 4
#: Requests of one connection in flight at once (the client's queue depth is bounded here).
MAX_INFLIGHT = 64
#: Of those, requests with a payload over 1 MiB (bounds memory: 4 x 32 MiB per connection;
#: per connection, so a client that stops reading its replies holds up only itself).
MAX_INFLIGHT_LARGE = 4
LARGE = 1 << 20
#: Requests up to this size may run on the event loop when the disk is free and fast: a
#: 1 MiB read from the page cache costs less than the thread hop and the GIL hand-over.
INLINE_MAX = 4 << 20
#: A disk whose recent calls took longer than this per 64 KiB (or per call, for smaller
#: ones) gets worker threads instead: slow storage must not stall the event loop.
SLOW_CALL_NS = 500_000
#: Replies of inline requests are batched up to this many bytes before a send.
BATCH_MAX = 256 << 10
#: The handshake must finish within this many seconds (a silent client is dropped).
HANDSHAKE_TIMEOUT = 60.0
#: A client may send at most this many options before choosing an export.
MAX_OPTIONS = 256
#: Socket receive size: big, so one system call brings many pipelined requests.
RECV_SIZE = 256 << 10
#: A connection whose requests never run dry yields to the other tasks this often.
YIELD_EVERY = 32
#: Busy-polling of an empty socket before sleeping in epoll (adaptive, per connection):
#: it starts at the minimum and grows to the maximum while requests come that soon.
POLL_MIN_NS = 4_000
POLL_MAX_NS = 32_000
#: Most buffers handed to one writev (the kernel's IOV_MAX is 1024).
IOV_MAX = 1024
#: How often the periodic commit task looks at the disks.
COMMIT_POLL = 1.0


@dataclass
class Export:
    """One disk offered under a name."""

    name: str
    disk: Any  # vdisk.api.Disk, or anything with its interface (the --snapshot overlay)
    readonly: bool = False
    description: str = ""
    image: str | None = None  # the image's path, for `vdisk info --stats`
    _avg_ns: float = field(default=0.0, repr=False)
    #: Held around every disk call this server makes (inline or in a thread). The Disk
    #: serialises its calls anyway; waiting here (in trio) instead of on the Disk's lock
    #: (in a thread) keeps fast calls inline: otherwise, once one call is in a thread,
    #: every request arriving meanwhile finds the lock taken and takes a thread too.
    gate: trio.Lock = field(default_factory=trio.Lock, repr=False)

    @property
    def size(self) -> int:
        return int(self.disk.size)

    def fast_zero(self) -> bool:
        """Whether write_zeroes is cheaper than writing zeros: not when the driver only
        has the protocol's default, which writes zero bytes."""
        driver = getattr(self.disk, "driver", None)
        if not isinstance(driver, Driver):
            return True
        return type(driver).write_zeroes is not Driver.write_zeroes

    def transmission_flags(self, structured: bool) -> int:
        flags = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_CAN_MULTI_CONN
        flags |= P.FLAG_SEND_CACHE
        if self.readonly:
            flags |= P.FLAG_READ_ONLY
        else:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        if structured:
            flags |= P.FLAG_SEND_DF  # every read is answered with one chunk anyway
        return flags

    def block_sizes(self) -> tuple[int, int, int]:
        """(minimum, preferred, maximum payload): any alignment works (the generic layer
        does read-modify-write); whole clusters are what is efficient."""
        cs = int(getattr(self.disk, "cluster_size", 4096) or 4096)
        preferred = 4096
        while preferred < min(cs, 2 << 20):
            preferred <<= 1
        return 1, preferred, P.MAX_PAYLOAD


class _Closed(Exception):
    """The peer closed the connection."""


class _Reader:
    """Buffered reads straight from the socket's descriptor into one reused buffer.

    Trio's socket calls yield to the scheduler after every successful call (a checkpoint
    by design); at queue depth 1 that is three scheduler passes per request where one
    wait for the next request is all that is needed. Here a read that finds data returns
    at once; only an empty socket waits (``wait_readable``, a checkpoint). The request
    loop adds its own checkpoints so a client that never lets the socket run dry cannot
    starve the other tasks."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.tls: ssl.SSLSocket | None = None  # after NBD_OPT_STARTTLS: reads decrypt
        self.buf = bytearray(RECV_SIZE)
        self.view = memoryview(self.buf)
        self.pos = 0  # unread bytes are buf[pos:end]
        self.end = 0
        self.waits = 0  # how often a read had to wait: each wait was a checkpoint
        self.poll_ns = 0  # how long a read that finds nothing retries before sleeping

    def _recv(self, view: memoryview) -> int:
        """One read into ``view``: from the descriptor, or through TLS after STARTTLS."""
        return os.readv(self.fd, (view,)) if self.tls is None else _tls_recv(self.tls, view)

    def _make_room(self, n: int) -> None:
        """Move the unread bytes to the front (growing the buffer for ``n``)."""
        unread = bytes(self.view[self.pos : self.end])  # a copy: source and target overlap
        if n > len(self.buf):
            self.view.release()
            self.buf = bytearray(n)
            self.view = memoryview(self.buf)
        self.buf[: len(unread)] = unread
        self.pos, self.end = 0, len(unread)

    async def fill(self, n: int) -> None:
        """Make at least ``n`` unread bytes available at ``buf[pos:]``."""
        while self.end - self.pos < n:
            if self.pos == self.end:
                self.pos = self.end = 0
            elif len(self.buf) - self.pos < n or self.end == len(self.buf):
                self._make_room(n)
            try:
                k = self._recv(self.view[self.end :])
            except BlockingIOError:
                k = self._poll() if self.poll_ns else -1
                if k < 0:
                    await self._wait()
                    continue
            if not k:
                raise _Closed
            self.end += k

    def _poll(self) -> int:
        """Retry the read for up to ``poll_ns``: what ``readv`` returned, -1 if nothing came.

        Going to sleep in epoll and being woken costs more than the gap between a reply
        and the next request of a client at queue depth 1 (a halted virtual CPU takes tens
        of microseconds to wake), so a short busy wait answers sooner; qemu's event loop
        polls for the same reason (``poll-max-ns``)."""
        deadline = time.perf_counter_ns() + self.poll_ns
        view = self.view[self.end :]
        while time.perf_counter_ns() < deadline:
            try:
                return self._recv(view)
            except BlockingIOError:
                pass
        return -1

    async def _wait(self) -> None:
        """Sleep until the socket is readable (a checkpoint); adapt the polling time the
        way qemu does: double it while waits are short enough that polling would have
        caught them, halve it when they are not (an idle client costs nothing)."""
        self.waits += 1
        t0 = time.perf_counter_ns()
        await trio.lowlevel.wait_readable(self.fd)
        waited = time.perf_counter_ns() - t0
        if waited < POLL_MAX_NS:
            self.poll_ns = min(POLL_MAX_NS, max(2 * self.poll_ns, POLL_MIN_NS))
        else:
            self.poll_ns //= 2
            if self.poll_ns < POLL_MIN_NS:
                self.poll_ns = 0

    async def read(self, n: int) -> bytes:
        await self.fill(n)
        p = self.pos
        self.pos = p + n
        return bytes(self.view[p : p + n])

    async def payload(self, n: int) -> bytearray:
        """``n`` bytes of payload: what is buffered, then straight into the result."""
        have = min(n, self.end - self.pos)
        out = bytearray(n)
        out[:have] = self.view[self.pos : self.pos + have]
        self.pos += have
        view = memoryview(out)
        got = have
        while got < n:
            try:
                k = self._recv(view[got:])
            except BlockingIOError:
                self.waits += 1
                await trio.lowlevel.wait_readable(self.fd)
                continue
            if not k:
                raise _Closed
            got += k
        return out

    async def skip(self, n: int) -> None:
        while n > 0:
            await self.fill(1)
            k = min(n, self.end - self.pos)
            self.pos += k
            n -= k


class _Outcome:
    __slots__ = ("error", "value")

    def __init__(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value = value
        self.error = error


_BUSY = object()
_READING = frozenset((P.CMD_READ, P.CMD_BLOCK_STATUS, P.CMD_CACHE))  # never commit


def _error_of(exc: BaseException, where: str) -> tuple[int, str]:
    """THE boundary: a vdisk error (or an OSError) becomes an NBD error value and a message."""
    if isinstance(exc, VdiskError | OSError):
        return P.nbd_error(getattr(exc, "errno", None)), describe(exc)
    log.error("%s: internal error", where, exc_info=exc)
    return P.EIO, f"internal error: {type(exc).__name__}"


class _FastZeroUnsupported(Exception):
    pass


class _Connection:
    def __init__(self, server: Server, stream: trio.SocketStream, peer: str) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.fd = stream.socket.fileno()
        self.reader = _Reader(self.fd)
        self.send_lock = trio.Lock()
        self.structured = False
        self.meta_export: str | None = None  # export the base:allocation context is for
        self.inflight = trio.Semaphore(MAX_INFLIGHT)
        self.inflight_large = trio.Semaphore(MAX_INFLIGHT_LARGE)
        self.current: str | None = None  # what we were reading when the peer vanished

    # -- sending -----------------------------------------------------------------------

    async def send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Send pieces back to back with gathering writes (no joining copy); one reply
        at a time, so replies of concurrent requests never interleave. Written at once
        when the socket takes it all (no checkpoint: the caller's loop has its own);
        only a full socket buffer waits, holding the lock."""
        lock = self.send_lock
        if lock.locked():
            await lock.acquire()
        else:
            lock.acquire_nowait()
        try:
            bufs = [p for p in parts if len(p)]
            while bufs:
                batch = bufs[:IOV_MAX]
                try:
                    tls = self.reader.tls
                    n = os.writev(self.fd, batch) if tls is None else _tls_send(tls, batch)
                except BlockingIOError:
                    n = 0
                short = n < _nbytes(batch)
                while bufs and n >= len(bufs[0]):
                    n -= len(bufs[0])
                    del bufs[0]
                if n:
                    bufs[0] = memoryview(bufs[0])[n:]
                if short:
                    await trio.lowlevel.wait_writable(self.fd)
        finally:
            lock.release()

    # -- the handshake -------------------------------------------------------------------

    async def run(self) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                chosen = await self.handshake()
            if chosen is not None:
                export, meta = chosen
                log.info("%s: connected to export %r", self.peer, export.name)
                await self.transmission(export, meta)
                log.info("%s: disconnected", self.peer)
            else:
                log.info("%s: disconnected (NBD_OPT_ABORT during the handshake)", self.peer)
        except* _Closed:
            if self.current:
                log.warning(
                    "%s: dropped: disconnected in the middle of %s", self.peer, self.current
                )
            else:
                log.info("%s: disconnected", self.peer)
        except* (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
            log.warning("%s: dropped: connection broken", self.peer)
        except* P.ProtocolError as eg:
            log.warning("%s: dropped: %s", self.peer, eg.exceptions[0])
        except* trio.TooSlowError:
            log.warning("%s: dropped: no export chosen within %ss", self.peer, HANDSHAKE_TIMEOUT)
        finally:
            if self.reader.tls is not None:
                self.reader.tls.close()  # the duplicate descriptor; trio closes the socket

    async def handshake(self) -> tuple[Export, bool] | None:
        r = self.reader
        flags = P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES
        await self.send(P.HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT, flags))
        (cflags,) = P.CLIENT_FLAGS.unpack(await r.read(4))  # a port probe just leaves here
        if cflags & ~P.KNOWN_CLIENT_FLAGS:
            raise P.ProtocolError(f"unknown client flags {cflags:#x}")
        no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        for _ in range(MAX_OPTIONS):
            self.current = None
            magic, opt, length = P.OPTION.unpack(await r.read(P.OPTION.size))
            self.current = "an option"
            if magic != P.IHAVEOPT:
                raise P.ProtocolError(f"bad option magic {magic:#x} (expected {P.IHAVEOPT:#x})")
            if length > P.MAX_OPTION_DATA:
                raise P.ProtocolError(
                    f"option {opt} carries {length} bytes (limit {P.MAX_OPTION_DATA})"
                )
            data = await r.read(length)
            self.current = None
            result = await self.option(opt, data, no_zeroes)
            if result is not None:
                return result if result is not False else None
        raise P.ProtocolError(f"more than {MAX_OPTIONS} options without choosing an export")

    async def reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        await self.send(P.option_reply(opt, rep, data))

    async def error(self, opt: int, rep: int, message: str) -> None:
        await self.reply(opt, rep, message.encode()[: P.MAX_STRING])

    async def option(self, opt: int, data: bytes, no_zeroes: bool) -> Any:
        """Handle one option; a (export, meta) pair enters transmission, False ends."""
        srv = self.server
        if srv.tls is not None and self.reader.tls is None:
            return await self.before_tls(opt, data)
        if opt == P.OPT_EXPORT_NAME:
            name = _decode(data)
            export = srv.lookup(name) if name is not None else None
            if export is None:
                raise P.ProtocolError(f"NBD_OPT_EXPORT_NAME of unknown export {data[:64]!r}")
            msg = P.EXPORT_NAME_REPLY.pack(export.size, export.transmission_flags(False))
            await self.send(msg if no_zeroes else msg + bytes(124))
            return export, False
        if opt == P.OPT_ABORT:
            await self.reply(opt, P.REP_ACK)
            return False
        if opt == P.OPT_LIST:
            if data:
                return await self.error(opt, P.REP_ERR_INVALID, "NBD_OPT_LIST takes no data")
            for e in srv.exports.values():
                raw = e.name.encode()
                await self.reply(opt, P.REP_SERVER, P.U32.pack(len(raw)) + raw)
            return await self.reply(opt, P.REP_ACK)
        if opt == P.OPT_STRUCTURED_REPLY:
            if data:
                return await self.error(opt, P.REP_ERR_INVALID, "option takes no data")
            self.structured = True
            return await self.reply(opt, P.REP_ACK)
        if opt in (P.OPT_INFO, P.OPT_GO):
            return await self.info_or_go(opt, data)
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            return await self.meta_context(opt, data)
        if opt == P.OPT_STARTTLS:
            if srv.tls is not None:
                return await self.error(opt, P.REP_ERR_INVALID, "TLS is already in use")
            return await self.error(opt, P.REP_ERR_POLICY, "TLS is not enabled on this server")
        return await self.error(opt, P.REP_ERR_UNSUP, f"option {opt} is not supported")

    async def before_tls(self, opt: int, data: bytes) -> Any:
        """A server with TLS serves nothing in the clear (proto.md, "forced TLS"): every
        option but STARTTLS and ABORT is refused; EXPORT_NAME, which has no error reply,
        ends the connection."""
        if opt == P.OPT_STARTTLS:
            if data:
                return await self.error(opt, P.REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data")
            await self.reply(opt, P.REP_ACK)
            return await self.start_tls()
        if opt == P.OPT_ABORT:
            await self.reply(opt, P.REP_ACK)
            return False
        if opt == P.OPT_EXPORT_NAME:
            raise P.ProtocolError("NBD_OPT_EXPORT_NAME without TLS on a server that requires it")
        return await self.error(opt, P.REP_ERR_TLS_REQD, "TLS is required: NBD_OPT_STARTTLS first")

    async def start_tls(self) -> None:
        """The TLS handshake on the connection (a duplicate descriptor wrapped by the ssl
        module, non-blocking, waited for through trio); then every byte goes through it."""
        r = self.reader
        assert self.server.tls is not None
        if r.end != r.pos:
            raise P.ProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake")
        raw = socket.socket(fileno=os.dup(self.fd))
        try:
            raw.setblocking(False)
            tls = self.server.tls.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        self.current = "the TLS handshake"
        try:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(self.fd)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(self.fd)
        except ssl.SSLError as e:
            tls.close()
            raise P.ProtocolError(f"TLS handshake failed: {e.reason or e}") from None
        except BaseException:
            tls.close()
            raise
        self.current = None
        r.tls = tls
        log.info("%s: TLS (%s, %s)", self.peer, tls.version(), (tls.cipher() or ("?",))[0])

    async def info_or_go(self, opt: int, data: bytes) -> Any:
        if len(data) < 6:
            return await self.error(opt, P.REP_ERR_INVALID, "option data too short")
        (n,) = P.U32.unpack_from(data, 0)
        if n > len(data) - 6:
            return await self.error(opt, P.REP_ERR_INVALID, f"name length {n} past the data")
        (nreq,) = P.U16.unpack_from(data, 4 + n)
        if len(data) != 6 + n + 2 * nreq:
            return await self.error(
                opt, P.REP_ERR_INVALID, f"{nreq} information requests do not fit the data"
            )
        name = _decode(data[4 : 4 + n])
        if name is None:
            return await self.error(opt, P.REP_ERR_INVALID, "export name is not valid UTF-8")
        requests = {P.U16.unpack_from(data, 6 + n + 2 * i)[0] for i in range(nreq)}
        export = self.server.lookup(name)
        if export is None:
            return await self.error(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
        flags = export.transmission_flags(self.structured)
        await self.reply(opt, P.REP_INFO, P.INFO_EXPORT_S.pack(P.INFO_EXPORT, export.size, flags))
        if P.INFO_NAME in requests or name != export.name:
            await self.reply(opt, P.REP_INFO, P.U16.pack(P.INFO_NAME) + export.name.encode())
        if P.INFO_DESCRIPTION in requests and export.description:
            desc = export.description.encode()[: P.MAX_STRING]
            await self.reply(opt, P.REP_INFO, P.U16.pack(P.INFO_DESCRIPTION) + desc)
        mn, pref, mx = export.block_sizes()
        await self.reply(opt, P.REP_INFO, P.INFO_BLOCK_SIZE_S.pack(P.INFO_BLOCK_SIZE, mn, pref, mx))
        await self.reply(opt, P.REP_ACK)
        if opt == P.OPT_GO:
            return export, self.structured and self.meta_export == export.name
        return None

    async def meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == P.OPT_SET_META_CONTEXT
        if setting:
            self.meta_export = None  # replaced even when this request fails
        if not self.structured:
            return await self.error(opt, P.REP_ERR_INVALID, "negotiate structured replies first")
        parsed = _parse_meta(data)
        if parsed is None:
            return await self.error(opt, P.REP_ERR_INVALID, "malformed meta context request")
        name, queries = parsed
        export = self.server.lookup(name)
        if export is None:
            return await self.error(opt, P.REP_ERR_UNKNOWN, f"no export named {name!r}")
        if setting:
            chosen = P.META_BASE_ALLOCATION in queries
        else:
            chosen = not queries or any(q in ("base:", P.META_BASE_ALLOCATION) for q in queries)
        if chosen:
            ctx = P.META_BASE_ALLOCATION.encode()
            await self.reply(opt, P.REP_META_CONTEXT, P.U32.pack(1 if setting else 0) + ctx)
            if setting:
                self.meta_export = export.name
        await self.reply(opt, P.REP_ACK)

    # -- transmission ---------------------------------------------------------------------

    async def transmission(self, export: Export, meta: bool) -> None:
        """The request loop. Replies of requests handled inline are collected while more
        requests are already buffered and sent with one system call (a client with a
        queue depth of 16 sends them in bursts): the peer wakes once, not per reply."""
        r = self.reader
        req = P.REQUEST
        size = export.size
        out: list[bytes | bytearray | memoryview] = []
        out_bytes = 0
        unyielded = 0  # requests handled since the last checkpoint
        waits = r.waits
        async with trio.open_nursery() as nursery:
            while True:
                self.current = None
                if out and (r.end - r.pos < 28 or out_bytes >= BATCH_MAX):
                    await self.send(*out)
                    out.clear()
                    out_bytes = 0
                if r.end - r.pos < 28:
                    await r.fill(28)
                unyielded += 1
                if r.waits != waits:
                    waits, unyielded = r.waits, 0
                elif unyielded >= YIELD_EVERY:
                    unyielded = 0
                    await trio.lowlevel.checkpoint()  # let the other tasks run
                magic, flags, cmd, cookie, offset, length = req.unpack_from(r.buf, r.pos)
                r.pos += 28
                if magic != P.REQUEST_MAGIC:
                    raise P.ProtocolError(
                        f"bad request magic {magic:#x} (expected {P.REQUEST_MAGIC:#x})"
                    )
                data: bytearray | None = None
                if cmd == P.CMD_WRITE:
                    self.current = f"a WRITE of {length} bytes at {offset}"
                    if out and r.end - r.pos < min(length, P.MAX_PAYLOAD):
                        await self.send(*out)  # do not hold replies while waiting for data
                        out.clear()
                        out_bytes = 0
                    if length > P.MAX_PAYLOAD:
                        await r.skip(length)
                        await self.fail(
                            cookie,
                            cmd,
                            P.EINVAL,
                            f"write of {length} bytes exceeds the maximum payload {P.MAX_PAYLOAD}",
                        )
                        continue
                    data = await r.payload(length)
                    self.current = None
                if cmd == P.CMD_DISC:
                    if out:
                        await self.send(*out)
                    return  # the nursery waits for the requests in flight
                problem = self.validate(export, meta, size, cmd, flags, offset, length)
                if problem is not None:
                    parts = self.error_parts(cookie, cmd, *problem)
                    out += parts
                    out_bytes += _nbytes(parts)
                    continue
                work = self.work(export, cmd, flags, offset, length, data)
                if self.inline_ok(export, cmd, flags, length):
                    gate = export.gate
                    try:
                        gate.acquire_nowait()
                    except trio.WouldBlock:
                        if out:  # do not hold replies back while waiting
                            await self.send(*out)
                            out.clear()
                            out_bytes = 0
                        await gate.acquire()
                    try:
                        outcome = _run_inline(export, work, length)
                    finally:
                        gate.release()
                    if outcome is not _BUSY:
                        parts = self.reply_parts(cookie, cmd, offset, length, outcome)
                        out += parts
                        out_bytes += _nbytes(parts)
                        continue
                if out:
                    await self.send(*out)
                    out.clear()
                    out_bytes = 0
                large = length > LARGE and cmd in (P.CMD_READ, P.CMD_WRITE)
                await self.inflight.acquire()
                if large:
                    await self.inflight_large.acquire()
                nursery.start_soon(
                    self.background, export, work, cookie, cmd, flags, offset, length, large
                )

    def validate(
        self, export: Export, meta: bool, size: int, cmd: int, flags: int, offset: int, length: int
    ) -> tuple[int, str] | None:
        allowed = P.ALLOWED_CMD_FLAGS.get(cmd)
        name = P.CMD_NAMES.get(cmd, str(cmd))
        if allowed is None:
            return P.EINVAL, f"unknown command {cmd}"
        if flags & ~allowed:
            return P.EINVAL, f"flags {flags:#x} not valid for {name}"
        if flags & P.CMD_FLAG_DF and not self.structured:
            return P.EINVAL, "NBD_CMD_FLAG_DF without structured replies"
        if cmd == P.CMD_BLOCK_STATUS and not meta:
            return P.EINVAL, "BLOCK_STATUS without a negotiated base:allocation context"
        if export.readonly and cmd in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES):
            return P.EPERM, f"{name} on a read-only export"
        if cmd == P.CMD_READ and length > P.MAX_PAYLOAD:
            return P.EINVAL, f"read of {length} bytes exceeds the maximum payload {P.MAX_PAYLOAD}"
        if cmd in (P.CMD_FLUSH,):
            return None
        if offset + length > size or offset > size:
            err = P.ENOSPC if cmd in (P.CMD_WRITE, P.CMD_WRITE_ZEROES) else P.EINVAL
            return err, f"{name} of {length} bytes at {offset} ends past the end ({size} bytes)"
        if cmd == P.CMD_BLOCK_STATUS and length == 0:
            return P.EINVAL, "BLOCK_STATUS of length 0"
        return None

    def inline_ok(self, export: Export, cmd: int, flags: int, length: int) -> bool:
        if cmd == P.CMD_FLUSH or flags & P.CMD_FLAG_FUA or length > INLINE_MAX:
            return False
        if cmd not in _READING and export.disk.commit_due(slack=1.0):
            return False  # this write would run the periodic commit: not on the event loop
        return export._avg_ns < SLOW_CALL_NS

    def work(
        self,
        export: Export,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        data: bytearray | None,
    ) -> Callable[[], Any]:
        """The disk calls of one request, as a function to run inline or in a thread."""
        disk = export.disk
        fua = bool(flags & P.CMD_FLAG_FUA)
        if cmd == P.CMD_READ:
            return lambda: disk.read_pieces(offset, length)  # sent as they are: no join
        if cmd == P.CMD_FLUSH:
            return disk.flush
        if cmd == P.CMD_BLOCK_STATUS:
            return lambda: _descriptors(disk.block_status(offset, length), flags, length)
        if cmd == P.CMD_CACHE:
            return lambda: disk.prefetch(offset, length)

        def write() -> None:
            if length:
                if cmd == P.CMD_WRITE:
                    disk.write(offset, data)
                elif cmd == P.CMD_TRIM:
                    disk.discard(offset, length)
                else:
                    if flags & P.CMD_FLAG_FAST_ZERO and not export.fast_zero():
                        raise _FastZeroUnsupported
                    disk.write_zeroes(offset, length, unmap=not flags & P.CMD_FLAG_NO_HOLE)
            if fua:
                disk.flush()

        return write

    async def background(
        self,
        export: Export,
        work: Callable[[], Any],
        cookie: int,
        cmd: int,
        flags: int,
        offset: int,
        length: int,
        large: bool,
    ) -> None:
        try:
            async with export.gate:
                outcome = await trio.to_thread.run_sync(
                    _run_timed, export, work, length, limiter=self.server.limiter
                )
            await self.send(*self.reply_parts(cookie, cmd, offset, length, outcome))
        finally:
            self.inflight.release()
            if large:
                self.inflight_large.release()

    def reply_parts(
        self, cookie: int, cmd: int, offset: int, length: int, outcome: _Outcome
    ) -> list[bytes]:
        """The reply to a request as pieces to send back to back."""
        if outcome.error is not None:
            if isinstance(outcome.error, _FastZeroUnsupported):
                err, msg = P.ENOTSUP, "write zeroes is not faster than writing on this image"
            else:
                err, msg = _error_of(outcome.error, f"{self.peer}: {P.CMD_NAMES[cmd]}")
            return self.error_parts(cookie, cmd, err, msg)
        if cmd == P.CMD_READ:
            if self.structured:
                if not length:
                    return [P.structured_none(cookie)]
                return [P.offset_data_header(cookie, offset, length), *outcome.value]
            return [P.simple_reply(cookie), *outcome.value]
        if cmd == P.CMD_BLOCK_STATUS:
            return [P.block_status_chunk(cookie, 1, outcome.value)]
        return [P.simple_reply(cookie)]

    def error_parts(self, cookie: int, cmd: int, err: int, message: str) -> list[bytes]:
        log.debug("%s: %s failed: %s", self.peer, P.CMD_NAMES.get(cmd, cmd), message)
        if self.structured:
            return [P.structured_error(cookie, err, message)]
        return [P.simple_reply(cookie, err)]

    async def fail(self, cookie: int, cmd: int, err: int, message: str) -> None:
        await self.send(*self.error_parts(cookie, cmd, err, message))


def _nbytes(parts: list[Any]) -> int:
    n = 0
    for p in parts:
        n += len(p)
    return n


def _run_inline(export: Export, work: Callable[[], Any], length: int) -> Any:
    """Run on the event loop if the disk's lock is free right now, else _BUSY: the event
    loop must never wait for a lock a worker thread holds (a flush may take seconds)."""
    done, outcome = export.disk.try_call(_run_timed, export, work, length)
    return outcome if done else _BUSY


def _run_timed(export: Export, work: Callable[[], Any], length: int) -> _Outcome:
    t0 = time.perf_counter_ns()
    try:
        return _Outcome(work())
    except Exception as e:
        return _Outcome(error=e)
    finally:
        # a moving average of what this disk's calls cost per 64 KiB: slow storage -> threads
        dt = (time.perf_counter_ns() - t0) * 65536 // max(length, 65536)
        export._avg_ns += (dt - export._avg_ns) / 8


def _descriptors(extents: Iterable[Any], flags: int, length: int) -> list[tuple[int, int]]:
    """base:allocation descriptors: DATA -> 0, ZERO -> ZERO, HOLE -> HOLE|ZERO (as qemu-nbd
    reports an unallocated or zero-flagged cluster), neighbours of equal state joined."""
    out: list[tuple[int, int]] = []
    for e in extents:
        state = 0 if e.kind == Kind.DATA else P.STATE_HOLE | P.STATE_ZERO
        if out and out[-1][1] == state and out[-1][0] + e.length < (1 << 32):
            out[-1] = (out[-1][0] + e.length, state)
        elif len(out) >= P.MAX_EXTENTS:
            break
        else:
            out.append((e.length, state))
    if not out:
        raise VdiskError(f"block status returned no extents for {length} bytes")
    if flags & P.CMD_FLAG_REQ_ONE:
        n, state = out[0]
        return [(min(n, length), state)]
    return out


def _decode(raw: bytes) -> str | None:
    if len(raw) > P.MAX_STRING:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _parse_meta(data: bytes) -> tuple[str, list[str]] | None:
    """(export name, queries) of a LIST/SET_META_CONTEXT request, None if malformed."""
    if len(data) < 8:
        return None
    (n,) = P.U32.unpack_from(data, 0)
    if 8 + n > len(data):
        return None
    name = _decode(data[4 : 4 + n])
    (count,) = P.U32.unpack_from(data, 4 + n)
    pos = 8 + n
    queries: list[str] = []
    for _ in range(count):  # each query takes at least 4 bytes: bounded by len(data)
        if pos + 4 > len(data):
            return None
        (ql,) = P.U32.unpack_from(data, pos)
        pos += 4
        if pos + ql > len(data):
            return None
        q = _decode(data[pos : pos + ql])
        if q is None or ":" not in q:
            return None
        queries.append(q)
        pos += ql
    if pos != len(data) or name is None:
        return None
    return name, queries


class Server:
    """Serves exports by name; ``default`` names the export of the empty name, if any."""

    def __init__(
        self,
        exports: list[Export],
        *,
        default: str | None = None,
        threads: int = DEFAULT_THREADS,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.exports = {e.name: e for e in exports}
        if len(self.exports) != len(exports):
            raise VdiskError("two exports have the same name")
        self.default = default
        self.limiter = trio.CapacityLimiter(threads)
        self.tls = tls  # set: TLS is required of every client
        self.connections = 0
        self.accepted = 0
        self._unix: list[tuple[str, int, int]] = []  # socket files to remove at the end

    def lookup(self, name: str) -> Export | None:
        if name == "" and self.default is not None:
            return self.exports.get(self.default)
        return self.exports.get(name)

    @staticmethod
    async def listen(host: str, port: int) -> list[trio.SocketListener]:
        """The listening sockets (port 0: the kernel picks a free port)."""
        return await trio.open_tcp_listeners(port, host=host)

    async def listen_unix(self, path: str) -> list[trio.SocketListener]:
        """A listening Unix socket at ``path`` (as qemu-nbd -k): a stale socket file left
        by a killed server is replaced; a live one, or any other file, is refused."""
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise VdiskError(f"{path}: exists and is not a socket")
            probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                await probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)  # nobody listens: left behind by a server that died
            except OSError as e:
                raise VdiskError(
                    f"{path}: cannot tell whether it is in use: {e.strerror}"
                ) from None
            else:
                raise VdiskError(f"{path}: another server is listening on it")
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            sock.listen(socket.SOMAXCONN)
            st = os.stat(path)
        except BaseException:
            sock.close()
            raise
        self._unix.append((path, st.st_dev, st.st_ino))
        return [trio.SocketListener(sock)]

    async def serve(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the bound (host, port)s once connections are
        accepted."""
        addrs = [_address(ln.socket.getsockname()) for ln in listeners]
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._commit_loop)
                await nursery.start(trio.serve_listeners, self._handle, listeners)
                task_status.started(addrs)
        finally:
            for e in self.exports.values():
                if e.image is not None:
                    runtime.unpublish(e.image)
            for path, dev, ino in self._unix:
                try:
                    st = os.lstat(path)
                    if (st.st_dev, st.st_ino) == (dev, ino):  # still ours
                        os.unlink(path)
                except OSError:
                    pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        try:
            host, port = _address(stream.socket.getpeername())
            peer = f"{host}:{port}" if port else f"unix socket #{self.accepted + 1}"
        except OSError:
            peer = "?"
        self.accepted += 1
        self.connections += 1
        try:
            await _Connection(self, stream, peer).run()
        except* Exception as eg:  # a bug: it ends this connection, never the server
            log.error("%s: dropped: internal error", peer, exc_info=eg)
        finally:
            self.connections -= 1
            await trio.aclose_forcefully(stream)

    async def _commit_loop(self) -> None:
        """The periodic commit: bounds what a crash of an idle server can lose."""
        while True:
            await trio.sleep(COMMIT_POLL)
            for e in self.exports.values():
                try:
                    async with e.gate:
                        await trio.to_thread.run_sync(_commit_and_publish, e, limiter=self.limiter)
                except VdiskError as exc:
                    log.error("%s: periodic commit failed: %s", e.name, describe(exc))


def _tls_recv(tls: ssl.SSLSocket, view: memoryview) -> int:
    """``os.readv`` through TLS: BlockingIOError when no whole record is there yet."""
    try:
        return tls.recv_into(view)
    except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
        raise BlockingIOError from None
    except ssl.SSLZeroReturnError:
        return 0
    except ssl.SSLError as e:
        raise P.ProtocolError(f"TLS: {e.reason or e}") from None


def _tls_send(tls: ssl.SSLSocket, batch: list[Any]) -> int:
    """``os.writev`` through TLS. After a would-block the same bytes are offered again
    (the send loop keeps them), as OpenSSL requires of a retried write."""
    try:
        return tls.send(b"".join(batch))
    except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
        raise BlockingIOError from None
    except ssl.SSLError as e:
        raise P.ProtocolError(f"TLS: {e.reason or e}") from None


def _address(name: Any) -> tuple[str, int]:
    """(host, port) of a TCP socket address; (path, 0) of a Unix one."""
    if isinstance(name, tuple):
        return str(name[0]), int(name[1])
    return (name.decode() if isinstance(name, bytes) else str(name)), 0


def _commit_and_publish(e: Export) -> None:
    if not e.readonly:
        e.disk.flush_if_due()
    if e.image is not None:
        runtime.publish(e.image, e.disk.stats(), "nbd")
