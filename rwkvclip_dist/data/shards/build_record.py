"""Which build an output folder of ``make_shards`` holds, so a second build never replaces it silently.

``OUT/.build/build.json`` records what a build reads and how (its input files, captions, label
options, image and shard options). A run with the same record resumes the build, as before; a run
with another one (other inputs, say) is refused, naming what differs, unless ``--overwrite``, which
first removes what the earlier build wrote (the files its record names, nothing else). An output
folder that holds other files and no record is refused the same way: it is not ours to fill.
"""
from __future__ import annotations

import json
import os
import re
import shutil

from rwkvclip_dist.outputs import OutputError, check_apart, check_folder_path, write_json

STATE_DIR = ".build"
REPORT = "build_report.json"
REJECTS = "build_rejects.jsonl"
RECORD = "build.json"
_PART = re.compile(r"part-\d+-of-\d+")


def _identity(opts, units) -> dict:
    def absolute(path):
        return None if path is None else os.path.abspath(path)

    return {"inputs": [os.path.abspath(u.path) for u in units], "captions": [absolute(p) for p in opts.captions],
            "labels": opts.labels, "classes": absolute(opts.classes), "resize_max_side": opts.resize_max_side,
            "size_limit": opts.size_limit, "jpeg_quality": opts.jpeg_quality}


def _built_by(out: str, record: dict) -> list[str]:
    """Names under ``out`` that the build of ``record`` wrote."""
    names = {"index.json", REPORT, REJECTS, STATE_DIR, *record.get("units", [])}
    names |= {n for n in os.listdir(out) if _PART.fullmatch(n)}
    return sorted(n for n in names if os.path.lexists(os.path.join(out, n)))


def claim_output(opts, units, overwrite: bool = False) -> None:
    """Check ``opts.out`` may receive this build (see the module docstring) and record it there."""
    out = opts.out
    check_folder_path(out, "--out")
    check_apart(out, "--out", {f"--input {u.path}": u.path for u in units}
                | {"--captions": c for c in opts.captions} | {"--classes": opts.classes}, inputs_read_whole=True)
    mine = {**_identity(opts, units), "units": [u.name for u in units]}
    path = os.path.join(out, STATE_DIR, RECORD)
    if os.path.isfile(path):
        with open(path) as f:
            theirs = json.load(f)
        if theirs == mine:
            return  # the same build: resume it
        differs = ", ".join(k for k in mine if theirs.get(k) != mine[k])
        if not overwrite:
            raise OutputError(f"--out {out}: holds another build (its record {path} differs in {differs}); run with "
                              f"the same options to resume it, choose another --out, or pass --overwrite to replace it")
        for name in _built_by(out, theirs):
            target = os.path.join(out, name)
            shutil.rmtree(target) if os.path.isdir(target) and not os.path.islink(target) else os.remove(target)
    elif not overwrite and os.path.isdir(out) and any(n != STATE_DIR and not _PART.fullmatch(n) for n in os.listdir(out)):
        # (.build and part folders alone: parts of this build starting at once on several nodes)
        raise OutputError(f"--out {out}: is not empty and holds no make_shards build record ({STATE_DIR}/{RECORD}); "
                          f"choose an empty or new folder, or pass --overwrite to build into it anyway")
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    write_json(path, mine)
