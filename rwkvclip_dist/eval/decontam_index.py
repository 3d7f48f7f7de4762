"""Builds the decontamination index (``rwkvclip_dist.data.shards.decontam``) from evaluation layouts.

Reads the ``test`` split of every task directory of a suite found under an evaluation data
directory (the layout ``tools/evaluate.py --suite`` reads), hashes each image and collects the
retrieval sets' captions. Images that do not decode are counted, not fatal.
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from rwkvclip_dist.data.shards.decontam import VARIANTS, eval_hashes, write_index
from rwkvclip_dist.eval.hf_arrow_sets import ArrowRetrievalSplit
from rwkvclip_dist.eval.suite import Suite
from rwkvclip_dist.eval.suite_runner import plan
from rwkvclip_dist.eval.webdataset_sets import IMAGE_EXTS, index_tars, shard_files

log = logging.getLogger(__name__)


def _hash_tar(job: tuple[str, str]) -> tuple[list[tuple[str, list[int]]], list[tuple[str, str]], int]:
    """``(hashes [(key, VARIANTS hashes)], captions [(key, text)], undecodable count)`` of one tar."""
    tar, kind = job
    hashes, captions, bad = [], [], 0
    with open(tar, "rb") as f:
        for key, members in index_tars([Path(tar)]):
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is not None:
                f.seek(members[ext].offset)
                try:
                    hashes.append((key, eval_hashes(f.read(members[ext].size))))
                except (OSError, ValueError):
                    bad += 1
            if kind == "retrieval" and "txt" in members:
                f.seek(members["txt"].offset)
                captions += [(key, line) for line in f.read(members["txt"].size).decode("utf-8").splitlines()]
    return hashes, captions, bad


def build_suite_index(suite: Suite, eval_dir: str | Path, out: str | Path, ngram: int = 0, workers: int = 1) -> dict:
    """Hashes every test image of ``suite``'s tasks present under ``eval_dir`` into an index at
    ``out``; returns a summary (tasks indexed, tasks missing, images, undecodable images)."""
    planned = plan([t for t in suite.tasks if not t.key.startswith("probe/")], eval_dir)
    present = {}
    for p in planned:  # the paper's probe tasks read the same folders as its zero-shot tasks
        if p.root is not None:
            present.setdefault(str(p.root), p.task.key)
    if not present:
        raise FileNotFoundError(f"{eval_dir}: none of suite {suite.name!r}'s task folders is there")
    tasks = list(present.values())
    jobs, owner = [], []
    items, hashes, captions, bad = [], [], [], 0
    for t, root in enumerate(present):
        if not (Path(root) / "test").is_dir():  # a Hugging Face cache folder (DataComp's retrieval sets)
            data = ArrowRetrievalSplit(root, transform=None)
            for i in range(len(data)):
                raw = data.images[i].as_py()["bytes"]
                try:
                    hashes.append(eval_hashes(raw))
                except (OSError, ValueError):
                    bad += 1
                    continue
                items.append((t, data.key(i)))
            captions += [(t, data.key(i), text) for i in range(len(data)) for text in data.captions(i)]
            continue
        kind_file = Path(root) / "dataset_type.txt"
        kind = kind_file.read_text().strip() if kind_file.is_file() else "classification"
        for tar in shard_files(Path(root) / "test"):
            jobs.append((str(tar), kind))
            owner.append(t)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        for t, (tar_hashes, caps, n_bad) in zip(owner, pool.map(_hash_tar, jobs)):
            items += [(t, key) for key, _ in tar_hashes]
            hashes += [h for _, h in tar_hashes]
            captions += [(t, key, text) for key, text in caps]
            bad += n_bad
    write_index(out, tasks, items, np.array(hashes, dtype=np.uint64).reshape(-1, VARIANTS),
                captions if ngram else [], ngram)
    summary = {"tasks": tasks, "missing": [p.task.key for p in planned if p.root is None], "images": len(items),
               "undecodable_images": bad, "captions": len(captions) if ngram else 0, "ngram": ngram}
    log.info("decontamination index %s: %d images of %d tasks, %d undecodable", out, len(items), len(tasks), bad)
    return summary
