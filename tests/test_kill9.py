"""kill -9 of a real writer process, many times: what was flushed is never lost.

The writer rewrites 48 KiB records (each crossing a cluster boundary) in random slots
and, after every flush returns, publishes the versions it knows are durable. After each
SIGKILL the image must open, check without corruption, and every slot must hold a whole
record of the published version or a later one: never older, never torn, never garbage.
"""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vdisk
from vdisk import formats

SLOTS = 48
SLOT_STRIDE = 64 * 1024
REC = 48 * 1024
REC_OFF = 40000  # inside the slot: records straddle a 64 KiB cluster boundary
CUT = SLOT_STRIDE - REC_OFF  # where the boundary falls inside a record

WRITER_TEMPLATE = r"""
import json, os, random, struct, sys
import vdisk
path, log, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
SLOTS, STRIDE, REC, OFF = {SLOTS}, {SLOT_STRIDE}, {REC}, {REC_OFF}
def record(slot, ver):
    return struct.pack("<II", slot, ver) * (REC // 8)
rng = random.Random(seed)
d = vdisk.open(path, cache_mb=float(sys.argv[4]))
versions = json.load(open(log)) if os.path.exists(log) else [0] * SLOTS
n = 0
while True:
    s = rng.randrange(SLOTS)
    versions[s] += 1
    d.write(s * STRIDE + OFF, record(s, versions[s]))
    n += 1
    if n % 7 == 0:
        d.flush()
        tmp = log + ".tmp"
        with open(tmp, "w") as f:
            json.dump(versions, f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, log)
"""
WRITER = WRITER_TEMPLATE.replace("{SLOTS}", str(SLOTS)).replace("{SLOT_STRIDE}", str(SLOT_STRIDE))
WRITER = WRITER.replace("{REC}", str(REC)).replace("{REC_OFF}", str(REC_OFF))

CRASH_SAFE = [f for f in ("vdisk", "qcow2") if f in formats.names()]


@pytest.mark.parametrize("fmt", CRASH_SAFE)
@pytest.mark.parametrize("cache_mb", [0, 8])
def test_kill9_writer(tmp_path, fmt, cache_mb):
    path = str(tmp_path / f"img.{fmt}")
    log = str(tmp_path / "durable.json")
    vdisk.create(path, SLOTS * SLOT_STRIDE + SLOT_STRIDE, format=fmt)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    rng = random.Random(fmt)
    for round_ in range(8):
        p = subprocess.Popen(
            [sys.executable, str(script), path, log, str(round_), str(cache_mb)],
            stderr=subprocess.PIPE,
        )
        time.sleep(rng.uniform(0.3, 1.2))
        if p.poll() is not None:
            raise AssertionError(f"writer died by itself: {p.stderr.read().decode()}")
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stderr.close()
        durable = json.loads(Path(log).read_text()) if os.path.exists(log) else [0] * SLOTS
        with vdisk.open(path, readonly=True) as d:
            report = d.check()
            assert not report.corruptions, f"round {round_}: {report.corruptions}"
            for s in range(SLOTS):
                data = d.read(s * SLOT_STRIDE + REC_OFF, REC)
                # the native format commits atomically: a record is all old or all new.
                # qcow2 writes in place: an unflushed record may be new in one cluster and
                # old in the other, but each piece is still a whole version, never garbage.
                pieces = [data] if fmt == "vdisk" else [data[:CUT], data[CUT:]]
                for piece in pieces:
                    if piece == bytes(len(piece)):
                        ver = 0
                    else:
                        slot, ver = struct.unpack_from("<II", piece)
                        assert slot == s, f"round {round_}: slot {s} holds slot {slot}'s record"
                        whole = struct.pack("<II", s, ver) * (len(piece) // 8)
                        assert piece == whole, f"round {round_}: slot {s} is torn or garbage"
                    assert ver >= durable[s], (
                        f"round {round_}: slot {s} lost flushed version {durable[s]} (has {ver})"
                    )

        # what survived is the new baseline: versions only grow from here. Where the two
        # pieces of a record differ (qcow2, unflushed), the older one is what is sure.
        def version(piece: bytes) -> int:
            return 0 if piece == bytes(len(piece)) else struct.unpack_from("<II", piece)[1]

        with vdisk.open(path, readonly=True) as d:
            survived = []
            for s in range(SLOTS):
                data = d.read(s * SLOT_STRIDE + REC_OFF, REC)
                survived.append(min(version(data[:CUT]), version(data[CUT:])))
        with open(log, "w") as f:
            json.dump([max(a, b) for a, b in zip(durable, survived)], f)
