"""A model of every view at once: writes, snapshot create/revert/delete, clone and commit
interleaved at random, and after each step every live view (the image, each snapshot,
each clone) is compared with its model."""

from __future__ import annotations

import os
import random

import pytest

import vdisk
from tests.conftest import pattern
from vdisk import formats, ops

pytestmark = pytest.mark.skipif("vdisk" not in formats.names(), reason="native format missing")

SIZE = 2 << 20


def _check(path: str, model: bytearray, snaps: dict[str, bytes]) -> None:
    with vdisk.open(path, readonly=True) as d:
        assert d.read(0, SIZE) == model, f"{path}: content differs from the model"
        names = {s.name for s in d.snapshots.list()}
        assert names == set(snaps), f"{path}: snapshots {names} != {set(snaps)}"
        for name, content in snaps.items():
            with d.snapshots.open(name) as v:
                assert v.read(0, SIZE) == content, f"{path}@{name} differs from the model"
        assert not d.check().corruptions


@pytest.mark.parametrize("seed", range(4))
def test_interleaved_views(tmp_path, seed):
    rng = random.Random(seed)
    base = str(tmp_path / "base.vdisk")
    vdisk.create(base, SIZE, format="vdisk", cluster_size=rng.choice([4096, 65536]))
    model = bytearray(SIZE)
    snaps: dict[str, bytes] = {}
    clones: dict[str, tuple[bytearray, dict[str, bytes]]] = {}
    counter = 0
    done: dict[str, int] = {}
    for _step in range(50):
        op = rng.random()
        counter += 1
        if op < 0.4 or (not clones and op < 0.5):
            # write into the base or into a clone
            target = base if not clones or rng.random() < 0.5 else rng.choice(list(clones))
            m = model if target == base else clones[target][0]
            if target == base and clones:
                continue  # the base of live clones is read-only by contract (a clone pins it)
            off = rng.randrange(0, SIZE - 1)
            n = min(rng.choice([1, 4096, 70000, 300000]), SIZE - off)
            data = pattern(off, n, seed=counter)
            with vdisk.open(target) as d:
                if rng.random() < 0.2:
                    d.write_zeroes(off, n)
                    data = bytes(n)
                else:
                    d.write(off, data)
            m[off : off + n] = data
        elif op < 0.55 and not clones:
            name = f"s{counter}"
            with vdisk.open(base) as d:
                d.snapshots.create(name)
            snaps[name] = bytes(model)
            done["snapshot"] = done.get("snapshot", 0) + 1
        elif op < 0.65 and snaps and not clones:
            name = rng.choice(list(snaps))
            with vdisk.open(base) as d:
                d.snapshots.revert(name)
            model[:] = snaps[name]
        elif op < 0.75 and snaps and not clones:
            name = rng.choice(list(snaps))
            with vdisk.open(base) as d:
                d.snapshots.delete(name)
            del snaps[name]
        elif op < 0.88 and _step > 15:
            if len(clones) >= 3:
                continue
            c = str(tmp_path / f"c{counter}.vdisk")
            vdisk.clone(base, c)
            clones[c] = (bytearray(model), {})
            done["clone"] = done.get("clone", 0) + 1
        elif clones:
            # commit one clone into the base: the base takes its content; the other clones
            # pinned the old base and must be dropped first (they would see mixed data)
            c = rng.choice(list(clones))
            for other in list(clones):
                if other != c:
                    os.unlink(other)
                    del clones[other]
            ops.commit(c)
            done["commit"] = done.get("commit", 0) + 1
            model[:] = clones[c][0]
            os.unlink(c)
            del clones[c]
        _check(base, model, snaps)
        for c, (cm, cs) in clones.items():
            _check(c, cm, cs)
    assert done.get("snapshot") and done.get("clone"), done
