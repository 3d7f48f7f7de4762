"""The evaluation suites: DataComp's 38 scored tasks and the RWKV-CLIP paper's protocol, as data.

A :class:`SuiteTask` says where a task's data lives under ``--data-dir`` (the directory names that
DataComp's ``download_evalsets.py`` and CLIP_benchmark's webdataset export write), how it is scored
(``kind``) and which number is its headline (``main_metric``, DataComp's name for it). The table is
DataComp's ``tasklist.yml`` written down: task keys, display names, main metrics (``acc1`` where the
list gives none) and the groups its ``aggregate_scores.py`` averages over.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# How a task is scored (rwkvclip_dist/eval/suite_runner.py has one routine per kind).
CLASSIFY, WILDS, RETRIEVAL, WINOGAVIL, LINEAR_PROBE = "classify", "wilds", "retrieval", "winogavil", "linear_probe"


@dataclass(frozen=True)
class SuiteTask:
    key: str
    """DataComp's task key (``vtab/cifar100``); ``probe/<name>`` for the paper's linear probes."""
    name: str
    """The display name that results files and DataComp's aggregation use."""
    kind: str = CLASSIFY
    main_metric: str = "acc1"
    groups: tuple[str, ...] = ()
    """Sub-averages this task belongs to (DataComp: ImageNet dist. shifts, VTAB, Retrieval)."""
    dirs: tuple[str, ...] = ()
    """Directory names under ``--data-dir`` that may hold the task, first match wins."""
    caption_prefix: str = ""
    """Put before every retrieval caption (the paper's "a photo of ")."""

    def candidates(self, data_dir: str | Path) -> list[Path]:
        return [Path(data_dir) / d for d in self.dirs]


def _wds_dirs(key: str) -> tuple[str, ...]:
    """DataComp names a task's folder ``wds_<key with / as ->_test`` (fairness tasks without their
    prefix); CLIP_benchmark's own exports on Hugging Face drop the ``_test``."""
    stem = key.split("/", 1)[1] if key.startswith("fairness/") else key
    stem = stem.replace("/", "-")
    return (f"wds_{stem}_test", f"wds_{stem}")


def _task(key: str, name: str, metric: str = "acc1", groups: tuple[str, ...] = (), kind: str = CLASSIFY,
          dirs: tuple[str, ...] = ()) -> SuiteTask:
    return SuiteTask(key, name, kind, metric, groups, dirs or _wds_dirs(key))


SHIFT, VTAB, RETR = "ImageNet dist. shifts", "VTAB", "Retrieval"
MPC = "mean_per_class_recall"

# Retrieval sets: DataComp's download leaves them in the Hugging Face cache (read by hf_arrow_sets.py);
# CLIP_benchmark publishes the same test splits as webdatasets (wds_flickr30k: Karpathy 1k test,
# wds_mscoco_captions: Karpathy 5k test).
FLICKR_DIRS = ("hf_cache/nlphuji___flickr_1k_test_image_text_retrieval", "wds_flickr30k")
COCO_DIRS = ("hf_cache/nlphuji___mscoco_2014_5k_test_image_text_retrieval", "wds_mscoco_captions")
WINO_DIR = "hf_cache/nlphuji___winogavil"

DATACOMP: tuple[SuiteTask, ...] = (
    _task("vtab/caltech101", "Caltech-101", MPC, (VTAB,)),
    _task("cifar10", "CIFAR-10"),
    _task("vtab/cifar100", "CIFAR-100", groups=(VTAB,)),
    _task("vtab/clevr_count_all", "CLEVR Counts", groups=(VTAB,)),
    _task("vtab/clevr_closest_object_distance", "CLEVR Distance", groups=(VTAB,)),
    _task("country211", "Country211"),
    _task("vtab/dtd", "Describable Textures", groups=(VTAB,)),
    _task("vtab/eurosat", "EuroSAT", groups=(VTAB,)),
    _task("fgvc_aircraft", "FGVC Aircraft", MPC),
    _task("food101", "Food-101"),
    _task("gtsrb", "GTSRB"),
    _task("imagenet1k", "ImageNet 1k"),
    _task("imagenet_sketch", "ImageNet Sketch", groups=(SHIFT,)),
    _task("imagenetv2", "ImageNet v2", groups=(SHIFT,)),
    _task("imagenet-a", "ImageNet-A", groups=(SHIFT,)),
    _task("imagenet-o", "ImageNet-O", groups=(SHIFT,)),
    _task("imagenet-r", "ImageNet-R", groups=(SHIFT,)),
    _task("vtab/kitti_closest_vehicle_distance", "KITTI Vehicle Distance", groups=(VTAB,)),
    _task("mnist", "MNIST"),
    _task("objectnet", "ObjectNet", groups=(SHIFT,)),
    _task("vtab/flowers", "Oxford Flowers-102", MPC, (VTAB,)),
    _task("vtab/pets", "Oxford-IIIT Pet", MPC, (VTAB,)),
    _task("voc2007", "Pascal VOC 2007"),
    _task("vtab/pcam", "PatchCamelyon", groups=(VTAB,)),
    _task("renderedsst2", "Rendered SST2"),
    _task("vtab/resisc45", "RESISC45", groups=(VTAB,)),
    _task("cars", "Stanford Cars"),
    _task("stl10", "STL-10"),
    _task("sun397", "SUN397", groups=(VTAB,)),
    _task("vtab/svhn", "SVHN", groups=(VTAB,)),
    _task("retrieval/flickr_1k_test_image_text_retrieval", "Flickr", "mean_recall@1", (RETR,), RETRIEVAL, FLICKR_DIRS),
    _task("retrieval/mscoco_2014_5k_test_image_text_retrieval", "MSCOCO", "mean_recall@1", (RETR,), RETRIEVAL,
          COCO_DIRS),
    # Pick the images associated with a cue, Jaccard score (rwkvclip_dist/eval/winogavil.py).
    SuiteTask("misc/winogavil", "WinoGAViL", WINOGAVIL, "jaccard_score_10-12", (RETR,), (WINO_DIR,)),
    _task("wilds/iwildcam", "iWildCam", "F1-macro_all", kind=WILDS),
    _task("wilds/camelyon17", "Camelyon17", kind=WILDS),
    _task("wilds/fmow", "FMoW", "acc_worst_region", kind=WILDS),
    _task("fairness/dollar_street", "Dollar Street", "acc_top5_wg", kind=WILDS),
    _task("fairness/geode", "GeoDE", "acc_wg", kind=WILDS),
)

# The paper's zero-shot table (11 sets, SPEC section 9: mean per class for Caltech-101, Aircraft,
# Flowers and Pets, top-1 elsewhere) and linear-probe table (the same sets without ImageNet).
_PAPER_SETS = (("cifar10", "CIFAR-10", "acc1"), ("vtab/cifar100", "CIFAR-100", "acc1"),
               ("food101", "Food-101", "acc1"), ("vtab/pets", "Oxford-IIIT Pet", MPC),
               ("vtab/flowers", "Oxford Flowers-102", MPC), ("sun397", "SUN397", "acc1"),
               ("cars", "Stanford Cars", "acc1"), ("vtab/dtd", "Describable Textures", "acc1"),
               ("vtab/caltech101", "Caltech-101", MPC), ("fgvc_aircraft", "FGVC Aircraft", MPC))
ZS, LP = "Zero-shot (11)", "Linear probe (10)"
PAPER: tuple[SuiteTask, ...] = (
    *(_task(k, n, m, (ZS,)) for k, n, m in _PAPER_SETS),
    _task("imagenet1k", "ImageNet 1k", groups=(ZS,)),
    *(SuiteTask(f"probe/{k}", f"{n} (linear probe)", LINEAR_PROBE, m, (LP,), _wds_dirs(k)) for k, n, m in _PAPER_SETS),
    SuiteTask("retrieval/flickr30k", "Flickr30k", RETRIEVAL, "mean_recall@1", (RETR,), FLICKR_DIRS, "a photo of "),
    SuiteTask("retrieval/mscoco", "MSCOCO", RETRIEVAL, "mean_recall@1", (RETR,), COCO_DIRS, "a photo of "),
)


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[SuiteTask, ...]
    headline: tuple[str, ...] = field(default=())
    """Single tasks reported beside the averages (DataComp reports ImageNet alone)."""

    def select(self, keys: list[str] | None) -> list[SuiteTask]:
        """The tasks named by ``keys`` (task keys or display names), in suite order; all when None."""
        if not keys:
            return list(self.tasks)
        known = {t.key: t for t in self.tasks} | {t.name: t for t in self.tasks}
        unknown = [k for k in keys if k not in known]
        if unknown:
            raise ValueError(f"--tasks: {unknown} are not tasks of suite {self.name!r}; "
                             f"its tasks are {[t.key for t in self.tasks]}")
        chosen = {known[k].key for k in keys}
        return [t for t in self.tasks if t.key in chosen]


SUITES = {"datacomp": Suite("datacomp", DATACOMP, ("ImageNet 1k",)),
          "paper": Suite("paper", PAPER, ("ImageNet 1k",))}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"--suite {name!r}: choose from {sorted(SUITES)}")
    return SUITES[name]
