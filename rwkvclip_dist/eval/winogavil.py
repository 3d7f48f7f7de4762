"""WinoGAViL (DataComp's ``misc/winogavil``) as DataComp's download step leaves it, and its score.

``download_evalsets.py`` loads ``nlphuji/winogavil`` (split ``test``) into ``DIR/hf_cache``: Arrow
stream files ``...-test*.arrow`` under ``DIR/hf_cache/nlphuji___winogavil/``, one row per game
instance with the columns DataComp's ``eval_utils/wino_eval.py`` reads: ``cue`` (a word),
``candidates`` (the candidate names), ``associations`` (the names the cue goes with) and
``candidate_images`` (one ``datasets`` Image struct per candidate: encoded ``bytes``, or a ``path``
to the file the dataset's loader extracted, absolute or relative to the dataset's folder).

The score, as DataComp's: the cue becomes the prompt "A <cue>" / "An <cue>" (lower-cased, "An"
before a vowel), the model picks as many candidates as the instance has associations (the most
similar images), and the instance scores the Jaccard index of the picked and the true sets. Scores
are averaged over all instances (``avg_jaccard_score``), over those with 5, 6, 10 and 12 candidates
and over 5-6 and 10-12; DataComp's headline is ``jaccard_score_10-12``. Every candidate image is
encoded once, sharded over ranks like any other set's images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rwkvclip_dist.eval.hf_arrow_sets import ImageItems, decode_image, read_test_table

COLUMNS = ("cue", "candidates", "associations", "candidate_images")


def cue_prompt(cue: str) -> str:
    """DataComp's prompt for a cue: ``"An <cue>"`` before a vowel, else ``"A <cue>"``, lower-cased."""
    cue = cue.lower()
    return f"An {cue}" if cue[:1] in "aeiou" and cue else f"A {cue}"


class WinoGavilSplit(ImageItems):
    """All candidate images of all instances, flattened: item ``i`` is ``(image, [i, ok])``, as the
    other readers' items, so :func:`rwkvclip_dist.eval.features.image_features` encodes each once."""

    def __init__(self, root: str | Path, transform, image_size: int = 224) -> None:
        self.root, self.transform, self.image_size = Path(root), transform, image_size
        table = read_test_table(self.root, COLUMNS)
        self.cues = table.column("cue").to_pylist()
        self.candidates = table.column("candidates").to_pylist()
        self.associations = table.column("associations").to_pylist()
        self.images = table.column("candidate_images")
        self.offsets = [0]
        for row, names in enumerate(self.candidates):
            n_images = len(self.images[row])
            if n_images != len(names):
                raise ValueError(f"{self.root}: row {row} has {len(names)} candidates but {n_images} images")
            self.offsets.append(self.offsets[-1] + n_images)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """``(row, candidate)`` of flat image ``index``."""
        row = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return row, index - self.offsets[row]

    def key(self, index: int) -> str:
        row, candidate = self.locate(index)
        return f"row{row}/{self.candidates[row][candidate]}"

    def truth(self, row: int) -> np.ndarray:
        """Which of the row's candidates are associations (DataComp: ``np.isin(candidates, associations)``)."""
        return np.isin(self.candidates[row], self.associations[row])

    def image(self, index: int):
        row, candidate = self.locate(index)
        return decode_image(self.images[row][candidate].as_py(), self.root)


def jaccard(truth: np.ndarray, picked: np.ndarray) -> float:
    """|truth & picked| / |truth | picked| of two boolean masks; 0 when both are empty (as sklearn's
    ``jaccard_score`` with its default ``zero_division``)."""
    union = int(np.logical_or(truth, picked).sum())
    return int(np.logical_and(truth, picked).sum()) / union if union else 0.0


def pick(similarities: np.ndarray, n: int) -> np.ndarray:
    """The mask of the ``n`` most similar candidates."""
    chosen = np.argsort(similarities, kind="stable")[len(similarities) - n:] if n else []
    return np.isin(np.arange(len(similarities)), chosen)


def winogavil_metrics(scores: list[float], n_candidates: list[int]) -> dict:
    """DataComp's WinoGAViL metrics from per-instance Jaccard scores and candidate counts (a group
    without instances scores NaN, as DataComp's mean of an empty array; written as JSON null)."""
    scores_a, groups = np.asarray(scores, dtype=float), np.asarray(n_candidates)

    def mean(mask) -> float:
        return float(scores_a[mask].mean()) if mask.any() else float("nan")

    out = {"avg_jaccard_score": mean(np.ones(len(scores_a), dtype=bool))}
    for n in (5, 6, 10, 12):
        out[f"jaccard_score_{n}"] = mean(groups == n)
    out["jaccard_score_5-6"] = mean(groups <= 6)
    out["jaccard_score_10-12"] = mean(groups >= 10)
    out["n"] = len(scores_a)
    return out


def score_instances(data: WinoGavilSplit, image_feats: torch.Tensor, readable: torch.Tensor,
                    cue_feats: torch.Tensor) -> tuple[dict, int]:
    """Metrics over the instances whose candidate images all decoded, and how many were left out
    (an instance missing an image cannot be scored as DataComp does: it would pick among fewer)."""
    scores, groups, skipped = [], [], 0
    for row in range(len(data.cues)):
        lo, hi = data.offsets[row], data.offsets[row + 1]
        if not bool(readable[lo:hi].all()):
            skipped += 1
            continue
        truth = data.truth(row)
        sims = (image_feats[lo:hi] @ cue_feats[row]).numpy()
        scores.append(jaccard(truth, pick(sims, int(truth.sum()))))
        groups.append(hi - lo)
    return winogavil_metrics(scores, groups), skipped
