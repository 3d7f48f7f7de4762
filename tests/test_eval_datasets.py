"""Labelled MDS evaluation sets read where they lie (``eval/datasets.py``): every sample of compressed
and raw shards in order, through loader workers too, and nothing written anywhere, so nothing is left
behind by a process that ends normally, is pre-empted (SIGTERM) or is killed (SIGKILL)."""
from __future__ import annotations

import io
import os
import shutil
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import PYTHON, REPO, dist_env


def _labelled_mds(path, n: int, compression: str | None) -> list[tuple[str, int]]:
    from streaming import MDSWriter

    rows = [(f"k{i}", (7 * i) % 10) for i in range(n)]
    with MDSWriter(out=str(path), columns={"key": "str", "jpg": "bytes", "label": "int"}, compression=compression,
                   size_limit=1 << 11) as writer:
        for key, label in rows:
            buf = io.BytesIO()
            Image.new("RGB", (8, 8), (25 * label, 0, 0)).save(buf, format="JPEG")
            writer.write({"key": key, "jpg": buf.getvalue(), "label": label})
    return rows


@pytest.mark.parametrize("compression", ["zstd", None])
def test_every_sample_is_read_in_order_from_the_shards_in_place(tmp_path, compression):
    from torch.utils.data import DataLoader
    from torchvision.transforms import ToTensor

    from rwkvclip_dist.eval.datasets import MDSLabelledImages

    rows = _labelled_mds(tmp_path / "set", 40, compression)
    before = sorted(p.name for p in (tmp_path / "set").iterdir())
    dataset = MDSLabelledImages(tmp_path / "set", ToTensor())
    assert len(dataset.shards) > 3 and len(dataset) == 40
    assert [(dataset.sample(i)["key"], dataset[i][1]) for i in range(40)] == rows
    assert dataset.sample(3)["key"] == "k3" and dataset.sample(39)["key"] == "k39"  # back and forth
    labels = [int(y) for _, batch in DataLoader(dataset, batch_size=6, num_workers=2) for y in batch]
    assert labels == [label for _, label in rows]
    assert sorted(p.name for p in (tmp_path / "set").iterdir()) == before
    with pytest.raises(IndexError):
        dataset.sample(40)


def test_a_missing_shard_file_is_named_when_the_set_opens(tmp_path):
    from rwkvclip_dist.eval.datasets import MDSLabelledImages

    _labelled_mds(tmp_path / "set", 20, "zstd")
    (tmp_path / "set" / "shard.00001.mds.zstd").unlink()
    with pytest.raises(FileNotFoundError, match=r"names shard file shard\.00001\.mds\.zstd, which is missing"):
        MDSLabelledImages(tmp_path / "set", None)


READER = textwrap.dedent("""
    import faulthandler, sys, time
    # A reader that hangs (as it did when its TMPDIR was too long for the workers' AF_UNIX sockets)
    # writes its threads' stacks to its .err file and exits: the test fails in minutes, saying where.
    faulthandler.dump_traceback_later(180, exit=True)
    from torch.utils.data import DataLoader
    from torchvision.transforms import ToTensor
    from rwkvclip_dist.eval.datasets import open_labelled_images

    dataset, _ = open_labelled_images(sys.argv[1], ToTensor())
    loader = iter(DataLoader(dataset, batch_size=4, num_workers=2))
    next(loader)
    print("reading", flush=True)
    if sys.argv[2] == "end":
        sum(1 for _ in loader)
    else:
        time.sleep(120)  # the workers hold their part of the set until the signal comes
""")


def test_nothing_is_left_behind_after_an_end_a_preemption_or_a_kill(tmp_path, request):
    """One reader process per way of ending, each with its own temporary folder (TMPDIR): an
    evaluation that decompressed the set into a temporary copy left it there when killed."""
    _labelled_mds(tmp_path / "set", 40, "zstd")
    procs, temps = {}, {}
    for how in ("end", "SIGTERM", "SIGKILL"):
        # Short: DataLoader workers put AF_UNIX sockets (at most 107 bytes of path) in TMPDIR, and
        # pytest's own folders (under xdist, .../popen-gw1/test_.../) can be too long for them.
        temps[how] = temp = Path(tempfile.mkdtemp(prefix=f"ev{how[-4:]}"))
        request.addfinalizer(lambda temp=temp: shutil.rmtree(temp, ignore_errors=True))
        # stderr to a file: a killed reader's orphaned workers keep its pipes open for a while.
        with open(tmp_path / f"{how}.err", "w") as stderr:
            procs[how] = subprocess.Popen([PYTHON, "-c", READER, str(tmp_path / "set"), how], cwd=REPO,
                                          env=dist_env(TMPDIR=str(temp)), stdout=subprocess.PIPE, stderr=stderr,
                                          text=True)
    for how, proc in procs.items():
        assert proc.stdout.readline().strip() == "reading", (tmp_path / f"{how}.err").read_text()[-3000:]
        if how != "end":
            proc.send_signal(getattr(signal, how))
    for how, proc in procs.items():
        proc.wait(timeout=120)
        assert proc.returncode == {"end": 0, "SIGTERM": -signal.SIGTERM, "SIGKILL": -signal.SIGKILL}[how]
        # The reader's DataLoader workers outlive a killed reader by a few seconds (they notice their
        # parent is gone and exit, removing multiprocessing's pymp-* folders): judge once they are gone.
        deadline = time.monotonic() + 60
        while True:
            left = [str(p.relative_to(temps[how])) for p in temps[how].rglob("*")]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert left == [], (how, left)
    shards = sorted(os.listdir(tmp_path / "set"))
    assert shards == ["index.json"] + [f"shard.{i:05d}.mds.zstd" for i in range(len(shards) - 1)]
