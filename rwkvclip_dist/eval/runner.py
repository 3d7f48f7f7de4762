"""The evaluation driver behind ``tools/evaluate.py``: tasks, feature reuse, results table.

Image features of a data set are computed once (:mod:`features`) and shared by every task that
reads that data set (zero-shot and the linear probe's test split). All ranks compute; rank 0 writes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from rwkvclip_dist.eval.classnames import class_names, load_class_prompts
from rwkvclip_dist.eval.datasets import open_labelled_images
from rwkvclip_dist.eval.distributed import all_gather_rows, padded_shard, rank
from rwkvclip_dist.eval.features import LoaderConfig, image_features
from rwkvclip_dist.eval.linear_probe import LinearProbeConfig, linear_probe
from rwkvclip_dist.eval.retrieval import retrieval_recall
from rwkvclip_dist.eval.retrieval_data import ImageListDataset, load_retrieval_annotations
from rwkvclip_dist.eval.zeroshot import encode_texts, zeroshot_scores
from rwkvclip_dist.outputs import write_json

TASKS = ("zeroshot", "retrieval", "linear_probe")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["zeroshot"])
    """Any of 'zeroshot', 'retrieval', 'linear_probe'."""
    data: str | None = None
    """Labelled test images (image folder or labelled MDS dir) for zeroshot and linear_probe."""
    train_data: str | None = None
    """Labelled training images for linear_probe."""
    templates: str = "imagenet"
    """Shipped template-set name or a JSON file (templates, optional classnames and metric)."""
    classnames: str | None = None
    """Text file, one class name per line in label order (overrides folder and template-set names)."""
    annotations: str | None = None
    """COCO / Karpathy / flat caption JSON for retrieval."""
    image_root: str | None = None
    """Directory the retrieval annotation's image paths are relative to."""
    split: str = "test"
    """Karpathy split to use for retrieval."""
    caption_prefix: str = ""
    """Prepended to every retrieval caption ("a photo of " in the paper)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    text_batch_size: int = 256
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)

    def check(self) -> None:
        """Every input the tasks need is given and exists (and the template set reads), before any
        model is loaded or feature computed."""
        unknown = set(self.tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown tasks {sorted(unknown)}; choose from {TASKS}")
        needed = {"zeroshot": [("--data", self.data)],
                  "linear_probe": [("--data", self.data), ("--train-data", self.train_data)],
                  "retrieval": [("--annotations", self.annotations), ("--image-root", self.image_root)]}
        for task in self.tasks:
            for flag, value in needed[task]:
                if not value:
                    raise ValueError(f"--task {task} needs {flag}")
                if not Path(value).exists():
                    raise FileNotFoundError(f"{flag} {value}: no such file or directory")
        if "zeroshot" in self.tasks:
            load_class_prompts(self.templates)
            if self.classnames and Path(self.classnames).is_dir():
                raise IsADirectoryError(f"--classnames {self.classnames}: is a directory; give a text file, one "
                                        f"class name a line")
            if self.classnames and not Path(self.classnames).is_file():
                raise FileNotFoundError(f"--classnames {self.classnames}: no such file")


class Evaluator:
    def __init__(self, model: nn.Module, eval_transform, tokenizer, config: EvalConfig, device: torch.device):
        config.check()
        self.model, self.transform, self.tokenizer = model, eval_transform, tokenizer
        self.config, self.device = config, device
        self._datasets: dict[str, tuple[torch.utils.data.Dataset, list[str] | None]] = {}
        self._features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.unreadable: dict[str, int] = {}
        """Images of each data set that could not be decoded and were left out (reported in the results)."""
        if "zeroshot" in config.tasks:  # class names are settled before any image is encoded
            self.prompts = load_class_prompts(config.templates)
            dataset, folder_names = self._open(config.data)
            self.classnames = class_names(self.prompts, folder_names, config.classnames, str(config.data),
                                          None if folder_names is not None else dataset.labels())

    def _open(self, path: str):
        if path not in self._datasets:
            self._datasets[path] = open_labelled_images(path, self.transform)
        return self._datasets[path]

    def labelled_features(self, path: str | None, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if path is None:
            raise ValueError(f"{what} needs a data directory")
        if path not in self._features:
            self._features[path] = image_features(self.model, self._open(path)[0], self.config.loader, self.device,
                                                  desc=f"features {Path(path).name}",
                                                  on_unreadable=lambda n: self.unreadable.__setitem__(path, n))
        return self._features[path]

    def zeroshot(self) -> dict:
        feats, labels = self.labelled_features(self.config.data, "zeroshot")
        templates = self.prompts["templates"]
        result = zeroshot_scores(self.model, feats, labels, self.classnames, templates, self.tokenizer,
                                 self.device, self.config.text_batch_size)
        metric = self.prompts.get("metric", "top1")
        return {"metric": metric, "score": result[metric], **result, "n_templates": len(templates),
                "unreadable_images": self.unreadable.get(self.config.data, 0)}

    def linear_probe(self) -> dict:
        train_feats, train_labels = self.labelled_features(self.config.train_data, "linear_probe (train)")
        test_feats, test_labels = self.labelled_features(self.config.data, "linear_probe (test)")
        return {**linear_probe(train_feats, train_labels, test_feats, test_labels, self.config.probe),
                "unreadable_images": sum(self.unreadable.get(p, 0) for p in {self.config.train_data, self.config.data})}

    def retrieval(self) -> dict:
        if not self.config.annotations or not self.config.image_root:
            raise ValueError("retrieval needs --annotations and --image-root")
        data = load_retrieval_annotations(self.config.annotations, self.config.image_root, self.config.split,
                                          self.config.caption_prefix)
        images, _ = image_features(self.model, ImageListDataset(data.image_paths, self.transform),
                                   self.config.loader, self.device, desc="retrieval images")
        # Captions outnumber images about 5:1 in COCO, so they are sharded over ranks as well.
        indices, n_real = padded_shard(len(data.captions))
        local = encode_texts(self.model, [data.captions[i] for i in indices], self.tokenizer, self.device,
                             self.config.text_batch_size, desc="retrieval captions")[:n_real]
        texts = all_gather_rows(local, len(data.captions))
        return retrieval_recall(images, texts, torch.tensor(data.text_to_image, device=images.device))

    def run(self) -> dict:
        results = {}
        for task in self.config.tasks:
            start = time.perf_counter()
            results[task] = getattr(self, task)()
            results[task]["seconds"] = round(time.perf_counter() - start, 3)
        return results


def format_table(results: dict) -> str:
    rows = [("task", "metric", "value")]
    for task, metrics in results.items():
        for key, value in metrics.items():
            if isinstance(value, float):
                rows.append((task, key, f"{value:.4f}"))
            elif isinstance(value, int) or value is None:
                rows.append((task, key, str(value)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(results: dict, config: EvalConfig, path: str | Path, model_name: str) -> None:
    if rank() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"model": model_name, "config": asdict(config), "results": results}, indent=1)
