"""Wiring of a vdisk mount: checks, the FUSE session, the trio nursery, teardown, umount.

Order of things (each step undone in reverse, also when a later one fails)::

    check DIR, /dev/fuse, root for --fs        nothing to undo
    open the disk (lock)                       disk.close(): write back, commit, unlock
    parse the partition table                  -
    pyfuse3.init (the kernel mount)            pyfuse3.close(unmount=True)
    trio.run: nursery {FUSE loop, periodic commit, controller}
        controller: read-ahead of the bdi, --fs: losetup + mount, state file, "ready";
        on SIGINT/SIGTERM/SIGHUP (or `vdisk umount`, which sends SIGTERM):
        umount the inner fs, losetup -d, then end the FUSE loop

The inner fs is unmounted while the FUSE loop still serves, because unmounting it writes
through the loop device into this very process. A busy inner fs is not unmounted lazily
(it would go on writing into a mount that is about to die): the mount stays and says so.

`vdisk umount DIR` finds the mount's process in a small state file, unmounts the inner fs
itself (so "busy" is reported at once) and sends SIGTERM, so there is one teardown path;
when that process is gone (kill -9) it undoes the steps itself: unmount of the inner fs,
losetup -d, fusermount3 -u.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyfuse3
import trio

from vdisk import api, runtime
from vdisk.errors import UsageError, VdiskError
from vdisk.fuse.fs import DiskFS
from vdisk.fuse.partitions import Partition, scan

log = logging.getLogger("vdisk.fuse")

#: Read-ahead of the mount's backing device info, for files opened without direct_io.
READ_AHEAD_KB = 4096
#: How long `vdisk umount` waits for the mount process to flush and exit.
UMOUNT_TIMEOUT = 120.0

Ready = Callable[[VdiskError | None], None]


@dataclass(slots=True)
class MountOptions:
    image: str
    mountpoint: str
    format: str | None = None
    readonly: bool = False
    snapshot: bool = False
    allow_other: bool = False
    fs: str | None = None  # None: no --fs; "auto", "disk", "pN" or "N"
    fs_dir: str | None = None  # where --fs mounts the guest fs (default DIR/fs)
    cache_mb: float | None = None
    threads: int = 4


@dataclass(slots=True)
class _State:
    """What the controller set up, to undo and to write into the state file."""

    opts: MountOptions
    target: str | None = None  # the file the loop device is over
    loop: str | None = None
    fs_dir: str | None = None
    fs_mounted: bool = False
    error: VdiskError | None = None
    early_signals: list[int] = field(default_factory=list)


# -- checks ---------------------------------------------------------------------------


def preflight(opts: MountOptions) -> None:
    """Everything that can be refused before anything is opened or mounted."""
    mp = opts.mountpoint
    if not os.path.exists(mp):
        raise UsageError(f"{mp}: mount point does not exist (mkdir it first)")
    if not os.path.isdir(mp):
        raise UsageError(f"{mp}: mount point is not a directory")
    if os.path.ismount(mp):
        raise UsageError(f"{mp}: already a mount point (vdisk umount {mp} first?)")
    try:
        if os.listdir(mp):
            raise UsageError(f"{mp}: mount point is not empty")
    except PermissionError:
        raise UsageError(f"{mp}: mount point is not readable (permission denied)") from None
    if not os.path.exists("/dev/fuse"):
        raise VdiskError(
            "/dev/fuse does not exist: load the fuse module (modprobe fuse), or in a "
            "container pass --device /dev/fuse"
        )
    if os.geteuid() != 0 and shutil.which("fusermount3") is None:
        raise VdiskError("fusermount3 is not installed (Debian: apt-get install fuse3)")
    if opts.fs is not None and os.geteuid() != 0:
        raise UsageError(
            "--fs needs root (loop devices and mount(8)). Without root, mount without --fs "
            f"and open the partition file yourself, e.g. `fuse2fs {mp}/p1 MNT` for ext4, "
            f"or run `sudo vdisk mount --fs ...`"
        )
    if opts.readonly and opts.snapshot:
        raise UsageError("--read-only and --snapshot exclude each other")
    if opts.fs_dir is not None:
        if opts.fs is None:
            raise UsageError("--fs-dir needs --fs")
        if not os.path.isdir(opts.fs_dir):
            raise UsageError(f"{opts.fs_dir}: --fs-dir is not an existing directory")


def open_disk(opts: MountOptions) -> api.Disk:
    """The disk the mount serves: the image itself, or a throw-away overlay over it."""
    return api.open(
        opts.image,
        format=opts.format,
        readonly=opts.readonly,
        snapshot=opts.snapshot,
        cache_mb=opts.cache_mb,
    )


def resolve_fs_target(choice: str, partitions: list[Partition], image: str) -> str:
    """--fs [PARTITION] -> the file name under DIR the loop device goes over."""
    names = [f"p{p.number}" for p in partitions]
    if choice in ("auto", ""):
        if not partitions:
            return "disk"
        if len(partitions) == 1:
            return names[0]
        raise UsageError(
            f"{image}: has {len(names)} partitions ({', '.join(names)}): name one, e.g. --fs={names[0]}"
        )
    if choice == "disk":
        return "disk"
    name = choice if choice.startswith("p") else f"p{choice}"
    if name not in names:
        have = ", ".join(names) if names else "none"
        raise UsageError(f"{image}: no partition {choice!r} (partitions: {have}; or --fs=disk)")
    return name


# -- state files (for `vdisk umount`) --------------------------------------------------


def state_path(mountpoint: str) -> str:
    """The state file of a mount; ``mountpoint`` is already resolved (the mount process
    must never resolve a path through its own mount: that stat would wait for itself)."""
    key = hashlib.sha256(mountpoint.encode()).hexdigest()[:20]
    return os.path.join(runtime.RUN_DIR, f"mount-{key}.json")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a reused pid apart), None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie has exited; only its parent has not reaped it
        return None
    return int(fields[19])


def _write_state(st: _State) -> None:
    path = state_path(st.opts.mountpoint)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    data = {
        "pid": os.getpid(),
        "start_time": _start_time(os.getpid()),
        "mountpoint": st.opts.mountpoint,
        "image": st.opts.image,
        "fs_dir": st.fs_dir if st.fs_mounted else None,
        "loop": st.loop,
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def _remove_state(mountpoint: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(state_path(mountpoint))


def _read_state(mountpoint: str) -> dict[str, Any] | None:
    try:
        with open(state_path(mountpoint)) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _mount_fstype(path: str) -> str | None:
    """The fs type mounted exactly at resolved ``path`` (from /proc/self/mountinfo)."""
    real = path
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split(" - ")
                left = parts[0].split()
                where = left[4].encode().decode("unicode_escape")
                if where == real:
                    found = parts[1].split()[0]
    except OSError:
        return None
    return found


def _bdi_of(path: str) -> str | None:
    """The backing-device name ("0:NN") of the mount at ``path``, read without stat(2)
    (a stat of our own mount from the thread that serves it would deadlock)."""
    real = path
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left = line.split(" - ")[0].split()
                if left[4].encode().decode("unicode_escape") == real:
                    return left[2]
    except OSError:
        pass
    return None


# -- the process of a mount ---------------------------------------------------------


def serve(opts: MountOptions, ready: Ready) -> None:
    """Mount and serve until unmounted or signalled; return after a clean teardown.

    ``ready(None)`` is called once the mount (and --fs) is usable, ``ready(error)`` if it
    could not be set up; either way the error is raised too."""
    preflight(opts)
    # resolve every path now: once mounted, resolving one through DIR would deadlock
    opts.mountpoint = os.path.realpath(opts.mountpoint)
    if opts.fs_dir is not None:
        opts.fs_dir = os.path.realpath(opts.fs_dir)
    with contextlib.ExitStack() as stack:
        # from here to the end of the teardown, a signal must neither kill the process with
        # the mount left dangling nor interrupt the final flush: it is noted, the controller
        # acts on it (trio's receiver takes over while the loop runs)
        early: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            previous = signal.signal(sig, lambda signum, _frame: early.append(signum))
            stack.callback(signal.signal, sig, previous)
        disk = open_disk(opts)
        stack.callback(disk.close)
        snap_disk = None
        if opts.snapshot:  # the overlay has no snapshots; show those of the image below
            snap_disk = api.open(
                opts.image,
                format=opts.format,
                readonly=True,
                cache_mb=(api.DEFAULT_CACHE_MB if opts.cache_mb is None else opts.cache_mb) / 4,
            )
            stack.callback(snap_disk.close)
        partitions = scan(disk.read, disk.size, opts.image)
        target = resolve_fs_target(opts.fs, partitions, opts.image) if opts.fs is not None else None
        fs = DiskFS(
            disk,
            partitions,
            image=opts.image,
            readonly=opts.readonly,
            fs_dir=opts.fs is not None and opts.fs_dir is None,
            threads=opts.threads,
            snapshots_of=snap_disk,
        )
        stack.callback(fs.close)
        options = set(pyfuse3.default_options)
        name = os.path.basename(opts.image).replace(",", "_").replace(" ", "_") or "image"
        options |= {f"fsname=vdisk:{name}", "subtype=vdisk"}
        if opts.allow_other:
            options.add("allow_other")
        if opts.readonly:
            options.add("ro")
        try:
            pyfuse3.init(fs, opts.mountpoint, options)
        except RuntimeError:
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=False)
            raise VdiskError(
                f"{opts.mountpoint}: the FUSE mount failed (see the message above; "
                "is the user allowed to use FUSE, is allow_other enabled in /etc/fuse.conf?)"
            ) from None
        stack.callback(pyfuse3.close, unmount=True)
        stack.callback(_remove_state, opts.mountpoint)
        st = _State(opts, target=target, early_signals=early)
        trio.run(_main, fs, st, ready)
        if st.error is not None:
            raise st.error


async def _main(fs: DiskFS, st: _State, ready: Ready) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_commit_loop, fs)
        nursery.start_soon(_controller, st, ready)
        await pyfuse3.main(min_tasks=2, max_tasks=64)
        # the loop ended (terminate, or an external unmount): stop the other tasks
        nursery.cancel_scope.cancel()


async def _commit_loop(fs: DiskFS) -> None:
    """Periodic commit, so a crash loses at most about one interval of writes."""
    interval = getattr(fs.disk, "commit_interval", None) or 5.0
    try:
        while True:
            await trio.sleep(max(0.2, interval / 5))
            try:
                await trio.to_thread.run_sync(_commit_and_publish, fs, limiter=fs.limiter)
            except VdiskError as e:
                log.error("periodic commit failed: %s", e)
    finally:
        runtime.unpublish(fs.image)


def _commit_and_publish(fs: DiskFS) -> None:
    fs.disk.flush_if_due()
    runtime.publish(fs.image, fs.disk.stats(), "fuse")


async def _controller(st: _State, ready: Ready) -> None:
    """Set up what follows the kernel mount, wait for a signal, undo it, end the loop."""
    announced = False
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            _set_read_ahead(st.opts.mountpoint)
            if st.target is not None:
                await _setup_fs(st)
            _write_state(st)
            ready(None)
            announced = True
            if st.early_signals:
                log.info("signal before the mount was ready: unmounting")
                await _teardown_fs(st, force=True)
                return
            async for signum in signals:
                log.info("signal %s: unmounting", signal.Signals(signum).name)
                if await _teardown_fs(st, force=False):
                    break
                # unmounting a busy guest fs lazily would leave it writing into a dead
                # mount: keep serving until whoever uses it lets go
                log.error(
                    "%s is busy: still mounted; close what uses it and unmount again",
                    st.fs_dir,
                )
        except VdiskError as e:
            st.error = e
        finally:
            with trio.CancelScope(shield=True):
                await _teardown_fs(st, force=True)
            with contextlib.suppress(Exception):
                pyfuse3.terminate()
            if not announced:
                ready(st.error or VdiskError("the mount ended before it was ready"))


def _set_read_ahead(mountpoint: str) -> None:
    bdi = _bdi_of(mountpoint)
    if bdi is None:
        return
    try:
        with open(f"/sys/class/bdi/{bdi}/read_ahead_kb", "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:  # not root: the default stays, direct_io files do not need it
        log.debug("read_ahead_kb of %s not set: %s", bdi, e)


async def _run(cmd: list[str]) -> str:
    """Run a helper (losetup, mount) without blocking the FUSE loop; its stdout, or a
    VdiskError with its first line of stderr."""
    try:
        res = await trio.run_process(cmd, capture_stdout=True, capture_stderr=True, check=False)
    except OSError as e:
        raise VdiskError(f"cannot run {cmd[0]}: {e.strerror}") from None
    if res.returncode != 0:
        msg = (res.stderr or b"").decode(errors="replace").strip().splitlines()
        raise VdiskError(
            f"{' '.join(cmd)} failed (exit {res.returncode}): {msg[-1] if msg else 'no message'}"
        )
    return res.stdout.decode(errors="replace").strip()


async def _setup_fs(st: _State) -> None:
    opts = st.opts
    assert st.target is not None
    path = os.path.join(opts.mountpoint, st.target)
    ro = ["--read-only"] if opts.readonly else []
    st.loop = await _run(["losetup", "--find", "--show", "--direct-io=on", *ro, path])
    st.fs_dir = opts.fs_dir or os.path.join(opts.mountpoint, "fs")
    mount_ro = ["-o", "ro"] if opts.readonly else []
    try:
        await _run(["mount", *mount_ro, st.loop, st.fs_dir])
    except VdiskError as e:
        raise VdiskError(
            f"{opts.image}: cannot mount the file system in {st.target} ({e}); "
            f"is there one? (`blkid {path}` tells)"
        ) from None
    st.fs_mounted = True


async def _teardown_fs(st: _State, *, force: bool) -> bool:
    """Undo --fs: unmount the guest fs (retrying for a while if busy), then free the loop
    device. False if the fs stayed busy; with ``force`` (the FUSE loop is ending anyway)
    it is then unmounted lazily."""
    if st.fs_mounted and st.fs_dir:
        for attempt in range(12):
            if _mount_fstype(st.fs_dir) is None:  # `vdisk umount` did it already
                break
            try:
                await _run(["umount", st.fs_dir])
                break
            except VdiskError as e:
                if attempt < 11:
                    await trio.sleep(0.25)
                elif not force:
                    return False
                else:
                    log.warning("%s; unmounting lazily", e)
                    with contextlib.suppress(VdiskError):
                        await _run(["umount", "-l", st.fs_dir])
        st.fs_mounted = False
    if st.loop:
        try:
            await _run(["losetup", "-d", st.loop])
        except VdiskError as e:
            log.warning("%s", e)
        st.loop = None
    return True


# -- vdisk umount ---------------------------------------------------------------------


def unmount(mountpoint: str, *, timeout: float = UMOUNT_TIMEOUT) -> None:
    """Flush and unmount a vdisk mount, foreground or background, with or without --fs."""
    real = os.path.realpath(os.path.abspath(mountpoint))
    state = _read_state(real)
    fstype = _mount_fstype(real)
    if state is None and fstype is None:
        raise UsageError(f"{mountpoint}: not mounted")
    if state is None and fstype != "fuse.vdisk":
        raise UsageError(f"{mountpoint}: not a vdisk mount (it is {fstype})")
    pid = state.get("pid") if state else None
    alive = (
        isinstance(pid, int)
        and _start_time(pid) is not None
        and _start_time(pid) == state.get("start_time")  # type: ignore[union-attr]
    )
    if alive:
        assert isinstance(pid, int) and state is not None
        fs_dir = state.get("fs_dir")
        if isinstance(fs_dir, str) and _mount_fstype(fs_dir) is not None:
            # unmount the guest fs here first, so a busy one is reported at once
            res = subprocess.run(["umount", fs_dir], capture_output=True, text=True, check=False)
            if res.returncode != 0:
                why = (res.stderr.strip().splitlines() or ["busy"])[-1]
                raise VdiskError(f"{fs_dir}: cannot unmount the guest file system: {why}")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _start_time(pid) is not None:
            if time.monotonic() > deadline:
                raise VdiskError(
                    f"{mountpoint}: the mount process (pid {pid}) is still flushing after "
                    f"{timeout:.0f} s; it has not been stopped"
                )
            time.sleep(0.05)
        if _mount_fstype(real) is None:
            _remove_state(real)
            return
        log.warning("%s: still mounted after the mount process exited; unmounting", mountpoint)
    # the process is gone (killed) or unknown: undo its steps from outside
    if state:
        fs_dir, loop = state.get("fs_dir"), state.get("loop")
        if isinstance(fs_dir, str) and _mount_fstype(fs_dir) is not None:
            _quiet(["umount", fs_dir]) or _quiet(["umount", "-l", fs_dir])
        if isinstance(loop, str) and loop.startswith("/dev/loop"):
            _quiet(["losetup", "-d", loop])
    if _mount_fstype(real) is not None:
        cmd = ["fusermount3", "-u", real]
        if not _quiet(cmd) and not _quiet(["fusermount3", "-u", "-z", real]):
            raise VdiskError(f"{mountpoint}: fusermount3 -u failed (is the mount in use?)")
    _remove_state(real)


def _quiet(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, check=False).returncode == 0
    except OSError as e:
        if e.errno == errno.ENOENT:
            raise VdiskError(f"{cmd[0]} is not installed") from None
        raise
