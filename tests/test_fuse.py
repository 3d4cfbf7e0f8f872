"""The FUSE front end: partition tables, the Operations, and real mounts (root, /dev/fuse).

Levels as in s3ql: partition parsing on images sfdisk made; the Operations called
directly over a real Disk (what pyfuse3 3.5 never calls: fallocate, lseek); then real
mounts started as `python -m vdisk mount` subprocesses, with real ext4 file systems on
loop devices over the mount's files. Every mount, loop device and process a test makes is
undone by the ``mounts`` fixture, also when the test fails.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import vdisk.api as api
from tests.conftest import VDISK, need, pattern, run
from vdisk.errors import CorruptImage
from vdisk.fuse import partitions as pt

MiB = 1 << 20


# -- partition tables -------------------------------------------------------------------


def _blank(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _open_errno(path: Path, flags: int) -> int:
    try:
        os.close(os.open(path, flags))
    except OSError as e:
        return e.errno
    return 0


def _reader(path: Path):
    def read(offset: int, length: int) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(length)
        return data + bytes(length - len(data))

    return read


def _sfdisk(path: Path, script: str) -> list[dict]:
    need("sfdisk")
    run(["sfdisk", "-q", str(path)], input=script)
    out = json.loads(run(["sfdisk", "-J", str(path)]).stdout)
    return out["partitiontable"]["partitions"]


def _numbers(parts: list[dict]) -> dict[int, tuple[int, int]]:
    """sfdisk's view: partition number -> (offset, length) in bytes."""
    out = {}
    for p in parts:
        node = p["node"]
        number = int(node[len(node.rstrip("0123456789")) :])
        out[number] = (p["start"] * 512, p["size"] * 512)
    return out


def test_mbr_with_logical_partitions_matches_sfdisk(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    _blank(img, 64 * MiB)
    parts = _sfdisk(
        img,
        "label: dos\n,8M,83\n,,5\n,10M,83\n,10M,83\n,,83\n",
    )
    want = {n: v for n, v in _numbers(parts).items() if n != 2}  # 2 is the extended one
    table = pt.read_table(_reader(img), 64 * MiB, str(img))
    assert table.kind == "mbr"
    got = {p.number: (p.offset, p.length) for p in table.partitions}
    assert got == want
    assert {5, 6, 7} <= set(got)


def test_gpt_matches_sfdisk_and_falls_back_to_the_backup_header(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    _blank(img, 32 * MiB)
    parts = _sfdisk(img, "label: gpt\nsize=4M, type=L, name=alpha\n,6M\n,\n")
    want = _numbers(parts)
    table = pt.read_table(_reader(img), 32 * MiB, str(img))
    assert table.kind == "gpt"
    assert {p.number: (p.offset, p.length) for p in table.partitions} == want
    assert table.partitions[0].name == "alpha"
    with open(img, "r+b") as f:  # break the primary header's CRC
        f.seek(512 + 90)
        f.write(b"\xff")
    table = pt.read_table(_reader(img), 32 * MiB, str(img))
    assert {p.number: (p.offset, p.length) for p in table.partitions} == want


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (a loop device with 4 KiB sectors)")
def test_gpt_with_4k_sectors(tmp_path: Path) -> None:
    need("sfdisk")
    img = tmp_path / "d.img"
    _blank(img, 32 * MiB)
    dev = run(["losetup", "--sector-size", "4096", "-f", "--show", str(img)]).stdout.strip()
    try:
        run(["sfdisk", "-q", dev], input="label: gpt\n,4M\n,\n", check=False)
        parts = json.loads(run(["sfdisk", "-J", dev]).stdout)["partitiontable"]["partitions"]
    finally:
        run(["losetup", "-d", dev])
    want = {i + 1: (p["start"] * 4096, p["size"] * 4096) for i, p in enumerate(parts)}
    table = pt.read_table(_reader(img), 32 * MiB, str(img))
    assert (table.kind, table.sector_size) == ("gpt", 4096)
    assert {p.number: (p.offset, p.length) for p in table.partitions} == want


def _mbr(entries: list[tuple[int, int, int]]) -> bytearray:
    sector = bytearray(512)
    for i, (ptype, lba, count) in enumerate(entries):
        struct.pack_into("<B3sB3sII", sector, 446 + 16 * i, 0, b"", ptype, b"", lba, count)
    sector[510:512] = b"\x55\xaa"
    return sector


def test_hostile_tables_give_clear_errors_and_bounded_work(tmp_path: Path) -> None:
    size = 8 * MiB
    disk = bytearray(size)
    # an EBR chain that loops
    disk[:512] = _mbr([(0x05, 2048, 8192)])
    ebr = _mbr([(0x83, 63, 100), (0x05, 1000, 100)])
    disk[2048 * 512 : 2049 * 512] = ebr
    disk[3048 * 512 : 3049 * 512] = ebr  # the second EBR links to itself

    def read(o: int, n: int) -> bytes:
        return bytes(disk[o : o + n])

    with pytest.raises(CorruptImage, match="loops back"):
        pt.read_table(read, size, "evil")
    # a GPT header with a valid CRC claiming 2^32-1 entries
    disk[:512] = _mbr([(0xEE, 1, size // 512 - 1)])
    hdr = bytearray(
        pt.GPT_HEADER.pack(
            b"EFI PART", 0x10000, 92, 0, 0, 1, size // 512 - 1, 34, size // 512 - 34,
            bytes(16), 2, 0xFFFFFFFF, 128, 0,
        )
    )  # fmt: skip
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    disk[512 : 512 + 92] = hdr
    with pytest.raises(CorruptImage, match="exceed the limit"):
        pt.read_table(read, size, "evil")
    # a FAT boot sector ends in 55 AA too, but its "entries" are code: no table
    disk[:512] = bytes(range(256)) * 2
    disk[510:512] = b"\x55\xaa"
    disk[512:1024] = bytes(512)
    assert pt.read_table(read, size, "fat").kind is None
    # a partition past the end of the disk is dropped with a warning, not trusted
    disk[:512] = _mbr([(0x83, 2048, 100), (0x83, size // 512 + 10, 100)])
    table = pt.read_table(read, size, "short")
    assert [p.number for p in table.partitions] == [1]
    assert table.warnings


# -- the Operations without a mount -------------------------------------------------------


def test_fallocate_and_lseek_translate_to_discard_zeroes_and_block_status(
    tmp_path: Path,
) -> None:
    """pyfuse3 3.5 has no fallocate/lseek handlers (the kernel answers EOPNOTSUPP and
    'all data'); the translations are still right for when it does."""
    pyfuse3 = pytest.importorskip("pyfuse3")
    trio = pytest.importorskip("trio")
    from vdisk.fuse.fs import DiskFS

    img = str(tmp_path / "d.vdisk")
    api.create(img, 4 * MiB, format="vdisk")
    with api.open(img) as disk:
        disk.write(0, pattern(0, 4 * MiB))
        disk.flush()
        fs = DiskFS(disk, [], image=img, readonly=False)

        async def go() -> None:
            inode = (await fs.lookup(pyfuse3.ROOT_INODE, b"disk")).st_ino
            fi = await fs.open(inode, os.O_RDWR, None)
            # punch 1 MiB + 100 KiB starting mid-cluster; zero-range a piece across clusters
            await fs.fallocate(fi.fh, 0x01 | 0x02, 100_000, MiB + 100 * 1024)
            await fs.fallocate(fi.fh, 0x10, 3 * MiB - 5000, 10_000)
            data = await fs.read(fi.fh, 0, 4 * MiB)
            want = bytearray(pattern(0, 4 * MiB))
            want[100_000 : 100_000 + MiB + 100 * 1024] = bytes(MiB + 100 * 1024)
            want[3 * MiB - 5000 : 3 * MiB + 5000] = bytes(10_000)
            assert data == bytes(want)
            hole = await fs.lseek(fi.fh, 0, os.SEEK_HOLE)
            assert 100_000 <= hole <= 196_608  # the first whole free cluster
            assert await fs.lseek(fi.fh, hole, os.SEEK_DATA) > hole
            with pytest.raises(pyfuse3.FUSEError) as e:
                await fs.lseek(fi.fh, 4 * MiB, os.SEEK_DATA)
            assert e.value.errno == errno.ENXIO
            await fs.release(fi.fh)

        trio.run(go)


# -- real mounts ------------------------------------------------------------------------

pytestmark_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


def _mountinfo() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) of every mount."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            where = left.split()[4].encode().decode("unicode_escape")
            fstype, source = right.split()[:2]
            out.append((where, fstype, source))
    return out


def _mounted(path: Path) -> str | None:
    real = os.path.realpath(path)
    found = [t for w, t, _ in _mountinfo() if w == real]
    return found[-1] if found else None


class Mounts:
    """Starts mounts and loop devices and undoes all of them, whatever happened."""

    def __init__(self) -> None:
        self.dirs: list[Path] = []
        self.procs: list[subprocess.Popen] = []
        self.loops: list[str] = []
        self.plain: list[Path] = []

    def mount(self, image: Path, mnt: Path, *args: str, check: bool = True):
        if mnt.parent.exists():
            mnt.mkdir(exist_ok=True)
        self.dirs.append(mnt)
        p = run([*VDISK, "mount", str(image), str(mnt), "-b", *args], check=check, timeout=60)
        if check:
            assert _mounted(mnt) == "fuse.vdisk"
        return p

    def foreground(self, image: Path, mnt: Path, *args: str) -> subprocess.Popen:
        mnt.mkdir(exist_ok=True)
        self.dirs.append(mnt)
        p = subprocess.Popen(
            [*VDISK, "mount", str(image), str(mnt), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(p)
        from vdisk.fuse.mount import state_path

        deadline = time.monotonic() + 30
        while not os.path.exists(state_path(os.path.realpath(mnt))):
            if p.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mount did not come up: {p.communicate()}")
            time.sleep(0.05)
        return p

    def umount(self, mnt: Path) -> None:
        run([*VDISK, "umount", str(mnt)], timeout=120)
        assert _mounted(mnt) is None

    def loop(self, path: Path, *extra: str) -> str:
        dev = run(["losetup", "--find", "--show", "--direct-io=on", *extra, str(path)]).stdout
        self.loops.append(dev.strip())
        return dev.strip()

    def mount_fs(self, dev: str, where: Path, *opts: str) -> None:
        where.mkdir(exist_ok=True)
        run(["mount", *opts, dev, str(where)])
        self.plain.append(where)

    def umount_fs(self, where: Path) -> None:
        run(["umount", str(where)])
        self.plain.remove(where)

    def free_loop(self, dev: str) -> None:
        run(["losetup", "-d", dev])
        self.loops.remove(dev)

    def pid_of(self, mnt: Path) -> int:
        from vdisk.fuse.mount import state_path

        with open(state_path(os.path.realpath(mnt))) as f:
            return int(json.load(f)["pid"])

    def cleanup(self) -> None:
        for where in reversed(self.plain):
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        for mnt in self.dirs:  # inner file systems of --fs and of tests
            real = os.path.realpath(mnt)
            for w, _t, _s in reversed(_mountinfo()):
                if w.startswith(real + "/"):
                    subprocess.run(["umount", "-l", w], capture_output=True)
        listing = subprocess.run(
            ["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"], capture_output=True, text=True
        ).stdout
        for line in listing.splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2 and any(
                parts[1].strip().startswith(os.path.realpath(m) + "/") for m in self.dirs
            ):
                self.loops.append(parts[0])
        for dev in set(self.loops):
            subprocess.run(["losetup", "-d", dev], capture_output=True)
        for mnt in self.dirs:
            pid = None
            try:
                pid = self.pid_of(mnt)
            except (OSError, ValueError):
                pass
            if _mounted(mnt) is not None:
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            if pid is not None:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


def _image(tmp_path: Path, fmt: str, size: int, name: str = "img") -> Path:
    path = tmp_path / f"{name}.{fmt}"
    if fmt == "raw":
        _blank(path, size)
    elif fmt == "qcow2":
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)])
    else:
        api.create(str(path), size, format=fmt)
    return path


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


@pytestmark_root
def test_tree_reads_writes_across_clusters_and_stats(tmp_path: Path, mounts: Mounts) -> None:
    img = _image(tmp_path, "vdisk", 48 * MiB)
    _sfdisk_on_disk = None
    with api.open(str(img)) as d:  # a GPT made by sfdisk on a raw copy, copied in
        raw = tmp_path / "t.raw"
        _blank(raw, 48 * MiB)
        _sfdisk(raw, "label: gpt\n,10M\n,20M\n")
        with open(raw, "rb") as f:
            head = f.read(MiB)
            f.seek(47 * MiB)
            tail = f.read(MiB)
        d.write(0, head)
        d.write(47 * MiB, tail)
        _sfdisk_on_disk = _numbers(
            json.loads(run(["sfdisk", "-J", str(raw)]).stdout)["partitiontable"]["partitions"]
        )
    mnt = tmp_path / "mnt"
    mounts.mount(img, mnt)
    assert sorted(os.listdir(mnt)) == ["disk", "p1", "p2", "snapshots", "stats"]
    assert (mnt / "p1").stat().st_size == _sfdisk_on_disk[1][1]
    p2_off = _sfdisk_on_disk[2][0]
    fd = os.open(mnt / "p2", os.O_RDWR)
    try:
        # odd offsets and lengths crossing 64 KiB clusters, and one 3 MiB request
        for off, n in ((65536 - 7, 20), (5 * 65536 - 1000, 3 * 65536 + 333), (MiB - 3, 3 * MiB)):
            assert os.pwrite(fd, pattern(p2_off + off, n, 7), off) == n
        os.fsync(fd)
        assert os.pread(fd, 3 * MiB, MiB - 3) == pattern(p2_off + MiB - 3, 3 * MiB, 7)
        # writing past the end of a partition never spills into the next bytes
        size2 = _sfdisk_on_disk[2][1]
        assert os.pwrite(fd, b"x" * 100, size2 - 10) == 10
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"x", size2)
        assert e.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    stats = json.loads((mnt / "stats").read_text())
    assert stats["cache"]["hits"] + stats["cache"]["misses"] > 0
    assert _open_errno(mnt / "stats", os.O_WRONLY) in (errno.EACCES, errno.EROFS)
    # the whole disk sees what went through the partition, at the partition's offset
    with open(mnt / "disk", "rb") as f:
        f.seek(p2_off + 65536 - 7)
        assert f.read(20) == pattern(p2_off + 65536 - 7, 20, 7)
    mounts.umount(mnt)
    with api.open(str(img), readonly=True) as d:
        off = p2_off + 5 * 65536 - 1000
        assert d.read(off, 3 * 65536 + 333) == pattern(off, 3 * 65536 + 333, 7)
        assert d.check().exit_code == 0


@pytestmark_root
@pytest.mark.parametrize("fmt", ["vdisk"])  # raw: the GPT test below
def test_ext4_on_disk_survives_unmount_and_remount(
    tmp_path: Path, mounts: Mounts, fmt: str
) -> None:
    need("mkfs.ext4")
    img = _image(tmp_path, fmt, 64 * MiB)
    mnt, inner = tmp_path / "mnt", tmp_path / "inner"
    files = {f"f{i}.bin": os.urandom(1000 + 300_000 * i) for i in range(4)}
    mounts.mount(img, mnt)
    run(["mkfs.ext4", "-q", "-F", str(mnt / "disk")])
    dev = mounts.loop(mnt / "disk")
    mounts.mount_fs(dev, inner)
    for name, data in files.items():
        (inner / name).write_bytes(data)
    mounts.umount_fs(inner)
    mounts.free_loop(dev)
    mounts.umount(mnt)
    mounts.mount(img, mnt, "--read-only")
    dev = mounts.loop(mnt / "disk", "--read-only")
    mounts.mount_fs(dev, inner, "-o", "ro")
    for name, data in files.items():
        assert (inner / name).read_bytes() == data
    mounts.umount_fs(inner)
    mounts.free_loop(dev)
    assert _open_errno(mnt / "disk", os.O_RDWR) in (errno.EROFS, errno.EACCES)
    mounts.umount(mnt)
    run(["e2fsck", "-fn", str(img)]) if fmt == "raw" else None


@pytestmark_root
def test_gpt_partitions_each_hold_their_own_ext4(tmp_path: Path, mounts: Mounts) -> None:
    need("mkfs.ext4")
    img = _image(tmp_path, "raw", 80 * MiB)
    mnt = tmp_path / "mnt"
    mounts.mount(img, mnt)
    assert not [n for n in os.listdir(mnt) if n.startswith("p")]
    # partitioned through the mount: the pN files follow the new table at once
    parts = _numbers(_sfdisk(mnt / "disk", "label: gpt\n,30M\n,,\n"))
    assert sorted(n for n in os.listdir(mnt) if n.startswith("p")) == ["p1", "p2"]
    assert (mnt / "p2").stat().st_size == parts[2][1]
    for n in (1, 2):
        run(["mkfs.ext4", "-q", "-F", "-L", f"part{n}", str(mnt / f"p{n}")])
        dev = mounts.loop(mnt / f"p{n}")
        where = tmp_path / f"in{n}"
        mounts.mount_fs(dev, where)
        (where / "who").write_text(f"partition {n}\n")
        mounts.umount_fs(where)
        mounts.free_loop(dev)
    mounts.umount(mnt)
    # the image, read without vdisk, has each file system exactly where sfdisk put it
    for n in (1, 2):
        off, length = parts[n]
        dev = mounts.loop(img, "-o", str(off), "--sizelimit", str(length), "--read-only")
        where = tmp_path / f"check{n}"
        mounts.mount_fs(dev, where, "-o", "ro")
        assert (where / "who").read_text() == f"partition {n}\n"
        mounts.umount_fs(where)
        mounts.free_loop(dev)


@pytestmark_root
def test_snapshot_mode_leaves_the_image_byte_identical(tmp_path: Path, mounts: Mounts) -> None:
    img = _image(tmp_path, "qcow2", 16 * MiB)
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 2M", str(img)])
    before = _sha(img)
    mnt = tmp_path / "mnt"
    mounts.mount(img, mnt, "--snapshot")
    with open(mnt / "disk", "r+b") as f:
        f.seek(MiB + 12345)
        f.write(pattern(0, 3 * MiB, 3))
        f.flush()
        os.fsync(f.fileno())
        f.seek(MiB + 12345)
        assert f.read(3 * MiB) == pattern(0, 3 * MiB, 3)
        f.seek(MiB)
        assert f.read(12345) == b"\x5a" * 12345
    mounts.umount(mnt)
    assert _sha(img) == before
    run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1M 2M", str(img)])


@pytestmark_root
@pytest.mark.parametrize("fmt", ["vdisk", "qcow2"])
def test_snapshot_files_hold_the_snapshots_content(
    tmp_path: Path, mounts: Mounts, fmt: str
) -> None:
    img = _image(tmp_path, fmt, 8 * MiB)
    if fmt == "qcow2":
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 100k 3M", str(img)])
        run(["qemu-img", "snapshot", "-c", "before", str(img)])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", str(img)])
        old = bytearray(8 * MiB)
        old[100 * 1024 : 100 * 1024 + 3 * MiB] = b"\x11" * (3 * MiB)
        new = bytearray(old)
        new[MiB : 2 * MiB] = b"\x22" * MiB
    else:
        old = bytearray(pattern(0, 8 * MiB, 1))
        new = bytearray(old)
        new[MiB - 5 : 3 * MiB] = pattern(MiB - 5, 2 * MiB + 5, 2)
        with api.open(str(img)) as d:
            d.write(0, bytes(old))
            d.snapshots.create("before")
            d.write(MiB - 5, bytes(new[MiB - 5 : 3 * MiB]))
    mnt = tmp_path / "mnt"
    mounts.mount(img, mnt)
    assert os.listdir(mnt / "snapshots") == ["before"]
    assert (mnt / "snapshots" / "before").read_bytes() == bytes(old)
    assert (mnt / "disk").read_bytes() == bytes(new)
    assert _open_errno(mnt / "snapshots" / "before", os.O_RDWR) in (errno.EROFS, errno.EACCES)
    mounts.umount(mnt)
    # a --snapshot mount shows the image's snapshots too
    mounts.mount(img, mnt, "--snapshot")
    assert (mnt / "snapshots" / "before").read_bytes() == bytes(old)
    mounts.umount(mnt)


@pytestmark_root
@pytest.mark.parametrize("fmt", ["vdisk", "qcow2"])
def test_kill_9_keeps_every_fsynced_file(tmp_path: Path, mounts: Mounts, fmt: str) -> None:
    need("mkfs.ext4")
    img = _image(tmp_path, fmt, 64 * MiB)
    mnt, inner = tmp_path / "mnt", tmp_path / "inner"
    mounts.mount(img, mnt)
    run(["mkfs.ext4", "-q", "-F", str(mnt / "disk")])
    mounts.umount(mnt)
    loops_before = run(["losetup", "-l", "-n"]).stdout
    mounts.mount(img, mnt, "--fs")
    inside = mnt / "fs"
    synced = {f"s{i}": os.urandom(70_000 * (i + 1)) for i in range(5)}
    for name, data in synced.items():
        with open(inside / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    run(["sync", "-f", str(inside)])  # the directory entries and the journal commit
    (inside / "unsynced").write_bytes(os.urandom(500_000))
    os.kill(mounts.pid_of(mnt), signal.SIGKILL)
    time.sleep(0.2)
    # vdisk umount undoes the steps of the dead process: guest fs, loop device, FUSE
    run([*VDISK, "umount", str(mnt)])
    assert _mounted(inside) is None and _mounted(mnt) is None
    assert run(["losetup", "-l", "-n"]).stdout == loops_before
    # the image opens and checks clean, and the guest fs has every fsynced file
    with api.open(str(img)) as d:
        assert d.check().exit_code in (0, 3)  # leaks are allowed after a crash
    if fmt == "qcow2":
        assert run(["qemu-img", "check", str(img)], check=False).returncode in (0, 3)
    mnt2 = tmp_path / "mnt2"
    mounts.mount(img, mnt2)
    dev = mounts.loop(mnt2 / "disk")
    mounts.mount_fs(dev, inner)  # replays the journal
    for name, data in synced.items():
        assert (inner / name).read_bytes() == data
    mounts.umount_fs(inner)
    mounts.free_loop(dev)
    run(["e2fsck", "-fn", str(mnt2 / "disk")])
    mounts.umount(mnt2)


@pytestmark_root
def test_fs_option_mounts_and_umount_undoes_every_step(tmp_path: Path, mounts: Mounts) -> None:
    need("mkfs.ext4")
    img = _image(tmp_path, "vdisk", 40 * MiB)
    with api.open(str(img)) as d:  # a one-partition MBR disk with ext4 in p1
        raw = tmp_path / "r.raw"
        _blank(raw, 40 * MiB)
        parts = _numbers(_sfdisk(raw, "label: dos\n,,83\n"))
        with open(raw, "rb") as f:
            d.write(0, f.read(512))
    mnt = tmp_path / "mnt"
    mounts.mount(img, mnt)
    run(["mkfs.ext4", "-q", "-F", str(mnt / "p1")])
    mounts.umount(mnt)
    loops_before = run(["losetup", "-l", "-n"]).stdout
    mounts.mount(img, mnt, "--fs")
    assert _mounted(mnt / "fs") == "ext4"
    (mnt / "fs" / "hello").write_text("hi\n")
    with open(mnt / "fs" / "hello") as busy:  # a busy guest fs is refused, not lazily dropped
        p = run([*VDISK, "umount", str(mnt)], check=False)
        assert p.returncode != 0 and "busy" in p.stderr, p.stderr
        assert _mounted(mnt / "fs") == "ext4" and busy.read() == "hi\n"
    mounts.umount(mnt)
    assert _mounted(mnt / "fs") is None and _mounted(mnt) is None
    assert run(["losetup", "-l", "-n"]).stdout == loops_before
    # an explicit partition and directory; the file is there
    other = tmp_path / "elsewhere"
    other.mkdir()
    mounts.dirs.append(other)
    mounts.mount(img, mnt, "--fs=p1", "--fs-dir", str(other), "--read-only")
    assert (other / "hello").read_text() == "hi\n"
    assert "fs" not in os.listdir(mnt)
    mounts.umount(mnt)
    assert _mounted(other) is None
    assert parts[1][0] == 2048 * 512


@pytestmark_root
def test_sigterm_and_sigint_flush_everything(tmp_path: Path, mounts: Mounts) -> None:
    img = _image(tmp_path, "vdisk", 8 * MiB)
    mnt = tmp_path / "mnt"
    for sig, seed in ((signal.SIGINT, 1), (signal.SIGTERM, 2)):
        p = mounts.foreground(img, mnt)
        fd = os.open(mnt / "disk", os.O_WRONLY)
        os.pwrite(fd, pattern(MiB - 100, 2 * MiB, seed), MiB - 100)  # no fsync
        os.close(fd)
        p.send_signal(sig)
        assert p.wait(timeout=60) == 0, p.communicate()
        assert _mounted(mnt) is None
        with api.open(str(img)) as d:  # opens: the lock is released
            assert d.read(MiB - 100, 2 * MiB) == pattern(MiB - 100, 2 * MiB, seed)


@pytestmark_root
def test_a_mount_that_cannot_proceed_fails_with_one_line(tmp_path: Path, mounts: Mounts) -> None:
    img = _image(tmp_path, "vdisk", 4 * MiB)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "x").write_text("")
    p = mounts.mount(img, mnt, check=False)
    assert p.returncode != 0 and "not empty" in p.stderr and len(p.stderr.splitlines()) == 1
    p = mounts.mount(img, tmp_path / "missing" / "dir", check=False)
    assert p.returncode != 0 and "does not exist" in p.stderr
    p = mounts.mount(tmp_path / "nothing.vdisk", tmp_path / "m0", check=False)
    assert p.returncode != 0 and "nothing.vdisk" in p.stderr and "Traceback" not in p.stderr
    assert _mounted(tmp_path / "m0") is None
    # a second writer of the same image: locked, and its directory stays unmounted
    mounts.mount(img, tmp_path / "m1")
    p = mounts.mount(img, tmp_path / "m2", check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and len(p.stderr.splitlines()) == 1
    assert _mounted(tmp_path / "m2") is None
    mounts.umount(tmp_path / "m1")
    p = run([*VDISK, "umount", str(tmp_path / "m2")], check=False)
    assert p.returncode != 0 and "not mounted" in p.stderr


@pytestmark_root
def test_concurrent_readers_and_writers_and_what_the_kernel_passes(
    tmp_path: Path, mounts: Mounts
) -> None:
    import threading

    img = _image(tmp_path, "vdisk", 32 * MiB)
    mnt = tmp_path / "mnt"
    mounts.mount(img, mnt, "--cache-mb", "8")  # small cache: evictions while writing
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            fd = os.open(mnt / "disk", os.O_RDWR)
            try:
                base = k * 8 * MiB
                for i in range(24):  # odd sizes, crossing clusters, 8 MiB apart per worker
                    off, n = base + i * 300_001, 100_000 + 37 * i
                    os.pwrite(fd, pattern(off, n, k + 10), off)
                    assert os.pread(fd, n, off) == pattern(off, n, k + 10)
            finally:
                os.close(fd)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    fd = os.open(mnt / "disk", os.O_RDWR)
    try:
        # pyfuse3 3.5 has no lseek or fallocate handler: the kernel treats the whole file
        # as data and refuses fallocate. If this starts failing, pyfuse3 passes them now
        # and DiskFS.lseek / DiskFS.fallocate are live.
        assert os.lseek(fd, 0, os.SEEK_HOLE) == 32 * MiB
        with pytest.raises(OSError) as e:
            fcntl_fallocate(fd, 0x01 | 0x02, 0, MiB)
        assert e.value.errno == errno.EOPNOTSUPP
    finally:
        os.close(fd)
    mounts.umount(mnt)
    with api.open(str(img), readonly=True) as d:
        for k in range(4):
            off = k * 8 * MiB + 23 * 300_001
            assert d.read(off, 100_000 + 37 * 23) == pattern(off, 100_000 + 37 * 23, k + 10)


def fcntl_fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytestmark_root
def test_every_format_qemu_writes_reads_back_through_the_mount(
    tmp_path: Path, mounts: Mounts
) -> None:
    """The mount holds no format logic: whatever vdisk reads, DIR/disk shows (qemu-img
    makes each image; writes through the mount land where qemu-io then finds them)."""
    need("qemu-img")
    from concurrent.futures import ThreadPoolExecutor

    writes = [(0x11, 65536 - 512, 4096), (0x22, 3 * MiB - 512, 2 * MiB + 1024)]
    fmts = ("vmdk", "vpc", "vhdx", "vdi", "parallels")  # qcow2: the tests above
    cmds = [a for pat, off, n in writes for a in ("-c", f"write -P {pat} {off} {n}")]
    for qfmt in fmts:
        img = tmp_path / f"d.{qfmt}"
        run(["qemu-img", "create", "-q", "-f", qfmt, str(img), str(8 * MiB)])
        run(["qemu-io", "-f", qfmt, *cmds, str(img)])
    with ThreadPoolExecutor(len(fmts)) as pool:  # mounts are independent: start them at once
        list(pool.map(lambda f: mounts.mount(tmp_path / f"d.{f}", tmp_path / f"m-{f}"), fmts))
    for qfmt in fmts:
        with open(tmp_path / f"m-{qfmt}" / "disk", "r+b") as f:
            for pat, off, n in writes:
                f.seek(off - 100)
                assert f.read(n + 200) == bytes(100) + bytes([pat]) * n + bytes(100), qfmt
            f.seek(5 * MiB - 7)
            f.write(b"\x5a" * 70_000)
    with ThreadPoolExecutor(len(fmts)) as pool:
        list(pool.map(lambda f: mounts.umount(tmp_path / f"m-{f}"), fmts))
    for qfmt in fmts:
        img = tmp_path / f"d.{qfmt}"
        run(["qemu-io", "-f", qfmt, "-c", f"read -P 0x5a {5 * MiB - 7} 70000", str(img)])


@pytestmark_root
def test_o_dsync_writes_survive_kill_9(tmp_path: Path, mounts: Mounts) -> None:
    """The kernel does not fsync direct_io writes of an O_DSYNC file, so the mount commits
    after each one itself (without it this data is lost: the commit interval is 5 s)."""
    img = _image(tmp_path, "vdisk", 16 * MiB)
    mnt = tmp_path / "mnt"
    mounts.mount(img, mnt)
    fd = os.open(mnt / "disk", os.O_WRONLY | os.O_DSYNC)
    try:
        os.pwrite(fd, pattern(3 * 65536 - 5, 300_000, 9), 3 * 65536 - 5)
    finally:
        os.close(fd)
    os.kill(mounts.pid_of(mnt), signal.SIGKILL)
    time.sleep(0.2)
    run([*VDISK, "umount", str(mnt)])
    with api.open(str(img), readonly=True) as d:
        assert d.read(3 * 65536 - 5, 300_000) == pattern(3 * 65536 - 5, 300_000, 9)
