"""The wheel carries the CUDA kernel sources: a user who installs rwkvclip_dist (not a repository
checkout) can still JIT-build the kernels, because setup.py copies csrc/ into the package as
rwkvclip_dist/_csrc and rwkvclip_dist/ops/build.py looks there when there is no checkout around it.
Built from a copy of the tracked files, installed into a scratch directory, inspected from a
separate interpreter whose path puts that installation first."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json
from rwkvclip_dist.ops import build
files = [build.SOURCE_DIR / name for name in (*build.SOURCES, *build.HEADERS)]
files += [build.EMULATION_SOURCE, *(build.EMULATION_SOURCE.parent / h for h in build.EMULATION_HEADERS)]
print(json.dumps({"module": build.__file__, "csrc": str(build.CSRC),
                  "missing": [str(f) for f in files if not f.is_file()], "name": build.BuildConfig().name()}))
"""


@pytest.mark.slow
def test_installed_wheel_finds_the_kernel_sources(tmp_path):
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    source = tmp_path / "src"
    for rel in filter(None, tracked.stdout.split("\0")):
        if (REPO / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            (source / rel).write_bytes((REPO / rel).read_bytes())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(source)],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("rwkvclip_dist-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert "rwkvclip_dist/_csrc/bi_wkv/sweep_kernel.cuh" in names
    assert "rwkvclip_dist/_csrc/testing/wmma_emulation.h" in names

    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, timeout=300)
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                           env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    assert found["module"].startswith(str(site)), found  # the installed copy, not the checkout
    assert found["csrc"] == str(site / "rwkvclip_dist" / "_csrc") and found["missing"] == []
    # same sources, flags and torch: the installed copy builds (and finds prebuilt) the same extension
    from rwkvclip_dist.ops.build import BuildConfig

    assert found["name"] == BuildConfig().name()
