"""Wire format of the NBD protocol: magics, constants and structs.

Everything here follows ``doc/proto.md`` of the NBD project (NetworkBlockDevice/nbd):
the fixed newstyle handshake, option haggling, simple and structured replies, and the
``base:allocation`` metadata context. All integers on the wire are big-endian.
"""

from __future__ import annotations

import errno as _errno
import struct

# -- magics (proto.md "Newstyle negotiation", "Request message", "Simple reply") ---------
NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags -------------------------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES

# -- transmission flags ---------------------------------------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- options --------------------------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# -- option replies -------------------------------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = (1 << 31) + 1
REP_ERR_POLICY = (1 << 31) + 2
REP_ERR_INVALID = (1 << 31) + 3
REP_ERR_PLATFORM = (1 << 31) + 4
REP_ERR_TLS_REQD = (1 << 31) + 5
REP_ERR_UNKNOWN = (1 << 31) + 6
REP_ERR_SHUTDOWN = (1 << 31) + 7
REP_ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
REP_ERR_TOO_BIG = (1 << 31) + 9

# -- NBD_REP_INFO types ---------------------------------------------------------------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# -- commands and command flags -------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

#: The flags each command may carry (proto.md "Command flags"); FUA is valid on all.
ALLOWED_CMD_FLAGS = {
    CMD_READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    CMD_WRITE: CMD_FLAG_FUA,
    CMD_DISC: CMD_FLAG_FUA,
    CMD_FLUSH: CMD_FLAG_FUA,
    CMD_TRIM: CMD_FLAG_FUA,
    CMD_WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    CMD_BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
    CMD_CACHE: CMD_FLAG_FUA,
}

# -- structured reply flags and types -------------------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- base:allocation ------------------------------------------------------------------------
META_BASE_ALLOCATION = "base:allocation"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- error values (proto.md "Error values") -------------------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

#: host errno -> NBD error; anything not listed becomes EIO.
_ERRNO_TO_NBD = {
    _errno.EPERM: EPERM,
    _errno.EACCES: EPERM,
    _errno.EROFS: EPERM,
    _errno.EIO: EIO,
    _errno.ENOMEM: ENOMEM,
    _errno.EINVAL: EINVAL,
    _errno.ENOSPC: ENOSPC,
    _errno.EDQUOT: ENOSPC,
    _errno.EFBIG: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW,
    _errno.ENOTSUP: ENOTSUP,
    _errno.EOPNOTSUPP: ENOTSUP,
    _errno.ESHUTDOWN: ESHUTDOWN,
}


def nbd_error(host_errno: int | None) -> int:
    """The NBD error value for a host errno (the protocol allows only a few values)."""
    return _ERRNO_TO_NBD.get(host_errno or _errno.EIO, EIO)


# -- limits -----------------------------------------------------------------------------------
#: Largest READ/WRITE payload accepted (what qemu-nbd accepts; proto.md: at least 32 MiB).
MAX_PAYLOAD = 32 << 20
#: Largest option payload accepted during the handshake; a longer one ends the session.
MAX_OPTION_DATA = 64 << 10
#: Longest name or string the protocol allows (proto.md "Conventions").
MAX_STRING = 4096
#: Most block status descriptors sent in one chunk (proto.md: SHOULD NOT exceed 2^20).
MAX_EXTENTS = 1 << 16

# -- structs ----------------------------------------------------------------------------------
HANDSHAKE = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
assert HANDSHAKE.size == 18
CLIENT_FLAGS = struct.Struct(">I")
assert CLIENT_FLAGS.size == 4
OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
assert OPTION.size == 16
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, reply type, length
assert OPTION_REPLY.size == 20
EXPORT_NAME_REPLY = struct.Struct(">QH")  # size, transmission flags (+124 zeroes)
assert EXPORT_NAME_REPLY.size == 10
INFO_EXPORT_S = struct.Struct(">HQH")  # NBD_INFO_EXPORT, size, transmission flags
assert INFO_EXPORT_S.size == 12
INFO_BLOCK_SIZE_S = struct.Struct(">HIII")  # NBD_INFO_BLOCK_SIZE, minimum, preferred, maximum
assert INFO_BLOCK_SIZE_S.size == 14
REQUEST = struct.Struct(">IHHQQI")  # magic, command flags, type, cookie, offset, length
assert REQUEST.size == 28
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
assert SIMPLE_REPLY.size == 16
STRUCTURED_REPLY = struct.Struct(">IHHQI")  # magic, flags, type, cookie, payload length
assert STRUCTURED_REPLY.size == 20
# a structured header followed by the 8-byte offset of an OFFSET_DATA chunk
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
assert OFFSET_DATA_HEADER.size == 28
ERROR_CHUNK = struct.Struct(">IH")  # error, message length (+ message)
assert ERROR_CHUNK.size == 6
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
DESCRIPTOR = struct.Struct(">II")  # extent length, status flags
assert DESCRIPTOR.size == 8


class ProtocolError(Exception):
    """The peer broke a MUST of the protocol: the session ends (a hard disconnect)."""


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def structured_none(cookie: int) -> bytes:
    return STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0
    )


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    msg = message.encode("utf-8", "replace")[:MAX_STRING]
    payload = ERROR_CHUNK.pack(error, len(msg)) + msg
    head = STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, len(payload)
    )
    return head + payload


def offset_data_header(cookie: int, offset: int, length: int, *, done: bool = True) -> bytes:
    return OFFSET_DATA_HEADER.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE if done else 0,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        length + 8,
        offset,
    )


def block_status_chunk(cookie: int, context_id: int, descriptors: list[tuple[int, int]]) -> bytes:
    """One BLOCK_STATUS chunk (with DONE: vdisk offers a single context)."""
    body = b"".join(DESCRIPTOR.pack(n, f) for n, f in descriptors)
    head = STRUCTURED_REPLY.pack(
        STRUCTURED_REPLY_MAGIC,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + len(body),
    )
    return head + U32.pack(context_id) + body
