"""qcow2 internal snapshots: the snapshot table.

Spec: QEMU docs/interop/qcow2.txt, "Snapshots". The table is a contiguous run of
variable-length entries (40-byte fixed part, extra data, id, name, padding to 8 bytes)
at ``snapshots_offset``; ``nb_snapshots`` says how many. Each entry names its own L1 table.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vdisk.errors import CorruptImage
from vdisk.storage import Storage

#: l1_table_offset, l1_size, id_len, name_len, date_sec, date_nsec, vm_clock_nsec,
#: vm_state_size (32-bit), extra_data_size
ENTRY = struct.Struct(">QIHHIIQII")
assert ENTRY.size == 40
#: extra data: vm_state_size (64-bit), disk_size, icount
EXTRA = struct.Struct(">QQ")
assert EXTRA.size == 16

MAX_SNAPSHOTS = 65536  # qemu's limit
MAX_TABLE_BYTES = 64 << 20  # qemu's limit on the whole table
MAX_EXTRA = 1024  # qemu's limit on one entry's extra data
MAX_L1_BYTES = 32 << 20


@dataclass(slots=True)
class Snapshot:
    l1_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    extra: bytes  # the whole extra data, kept so rewriting the table preserves it


def parse_table(storage: Storage, offset: int, count: int, cluster_size: int) -> list[Snapshot]:
    """Read and validate the snapshot table (bounds checked before anything is trusted)."""
    path = storage.path
    if count == 0:
        return []
    if count > MAX_SNAPSHOTS:
        raise CorruptImage(f"{path}: nb_snapshots is {count}, over the limit of {MAX_SNAPSHOTS}")
    fsize = storage.size()
    if offset == 0 or offset % cluster_size:
        raise CorruptImage(
            f"{path}: snapshots_offset {offset:#x} is not a non-zero multiple of the "
            f"cluster size {cluster_size}"
        )
    if offset >= fsize:
        raise CorruptImage(
            f"{path}: snapshot table at {offset:#x} starts past the end of the file ({fsize})"
        )
    out: list[Snapshot] = []
    pos = offset
    limit = min(fsize, offset + MAX_TABLE_BYTES)
    for n in range(count):
        if pos + ENTRY.size > limit:
            raise CorruptImage(
                f"{path}: snapshot table entry {n} at {pos:#x} runs past the end of the "
                f"table (limit {limit:#x})"
            )
        fixed = storage.pread_exact(pos, ENTRY.size, f"snapshot table entry {n}")
        l1_off, l1_size, id_len, name_len, sec, nsec, clock, vm32, extra_size = ENTRY.unpack(fixed)
        if extra_size > MAX_EXTRA:
            raise CorruptImage(
                f"{path}: snapshot {n}: extra_data_size {extra_size} over the limit {MAX_EXTRA}"
            )
        used = ENTRY.size + extra_size + id_len + name_len
        total = used + (-used % 8)  # qemu may end the file before the last entry's padding
        if pos + used > limit:
            raise CorruptImage(
                f"{path}: snapshot table entry {n} at {pos:#x} ({used} bytes) runs past the "
                f"end of the table (limit {limit:#x})"
            )
        rest = storage.pread_exact(
            pos + ENTRY.size, extra_size + id_len + name_len, f"snapshot {n}"
        )
        extra = rest[:extra_size]
        vm_state, disk_size = vm32, None
        if extra_size >= 8:
            vm_state = struct.unpack_from(">Q", extra, 0)[0]
        if extra_size >= 16:
            disk_size = struct.unpack_from(">Q", extra, 8)[0]
        try:
            sid = rest[extra_size : extra_size + id_len].decode()
            name = rest[extra_size + id_len :].decode()
        except UnicodeDecodeError:
            raise CorruptImage(f"{path}: snapshot {n}: id or name is not UTF-8") from None
        if l1_off % cluster_size:
            raise CorruptImage(
                f"{path}: snapshot {name!r}: L1 table offset {l1_off:#x} is not cluster aligned"
            )
        if l1_size * 8 > MAX_L1_BYTES:
            raise CorruptImage(
                f"{path}: snapshot {name!r}: l1_size {l1_size} over the limit {MAX_L1_BYTES // 8}"
            )
        if l1_size and (l1_off == 0 or l1_off + l1_size * 8 > fsize):
            raise CorruptImage(
                f"{path}: snapshot {name!r}: L1 table at {l1_off:#x} ({l1_size} entries) is "
                f"outside the file ({fsize} bytes)"
            )
        out.append(
            Snapshot(l1_off, l1_size, sid, name, sec, nsec, clock, vm_state, disk_size, extra)
        )
        pos += total
    return out


def table_bytes(snaps: list[Snapshot]) -> bytes:
    """Serialise a snapshot table (v3 entries carry at least the 16 bytes of extra data)."""
    parts = []
    for s in snaps:
        extra = bytearray(s.extra)
        if len(extra) < 16:
            extra.extend(bytes(16 - len(extra)))
        struct.pack_into(">QQ", extra, 0, s.vm_state_size, s.disk_size or 0)
        sid, name = s.id.encode(), s.name.encode()
        head = ENTRY.pack(
            s.l1_offset,
            s.l1_size,
            len(sid),
            len(name),
            s.date_sec,
            s.date_nsec,
            s.vm_clock_nsec,
            min(s.vm_state_size, 0xFFFFFFFF),
            len(extra),
        )
        entry = head + bytes(extra) + sid + name
        parts.append(entry + bytes(-len(entry) % 8))
    return b"".join(parts)
