"""Run a suite (``tools/evaluate.py --suite``) or any subset of its tasks (the in-loop evaluation).

Before the model loads, :func:`plan` finds every task's directory under ``--data-dir`` and lists
the tasks whose data is missing with the paths looked for. Each finished task is appended as one
line to the results JSONL (DataComp's ``eval_results.jsonl`` record: ``key``, ``dataset``,
``main_metric``, ``metrics``), flushed and synced, so a killed evaluation re-run with the same
command scores only the tasks without a line. All ranks encode a shard of every set
(:func:`rwkvclip_dist.eval.features.image_features`); rank 0 writes.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from rwkvclip_dist.eval.distributed import all_gather_rows, padded_shard, rank
from rwkvclip_dist.eval.features import LoaderConfig, image_features
from rwkvclip_dist.eval.hf_arrow_sets import ArrowRetrievalSplit, arrow_files
from rwkvclip_dist.eval.linear_probe import LinearProbeConfig, linear_probe
from rwkvclip_dist.eval.retrieval import retrieval_recall
from rwkvclip_dist.eval.suite import CLASSIFY, LINEAR_PROBE, RETRIEVAL, WILDS, WINOGAVIL, Suite, SuiteTask
from rwkvclip_dist.eval.suite_metrics import classification_metrics, retrieval_metrics, wilds_metrics
from rwkvclip_dist.eval.webdataset_sets import WebDatasetSplit, open_task_dir
from rwkvclip_dist.eval.winogavil import WinoGavilSplit, cue_prompt, score_instances
from rwkvclip_dist.eval.zeroshot import build_zeroshot_classifier, encode_texts
from rwkvclip_dist.outputs import strict_json


@dataclass
class Planned:
    task: SuiteTask
    root: Path | None
    """The task's directory, None when missing."""
    looked_for: list[str] = field(default_factory=list)


def plan(tasks: list[SuiteTask], data_dir: str | Path) -> list[Planned]:
    """Every task with its directory (the first candidate that has the split the task reads)."""
    out = []
    for task in tasks:
        splits = ("train", "test") if task.kind == LINEAR_PROBE else ("test",)
        hf_cache = task.kind in (RETRIEVAL, WINOGAVIL)  # DataComp's download keeps these as HF datasets
        found = next((c for c in task.candidates(data_dir) if all((c / s).is_dir() for s in splits)
                      or (hf_cache and c.name.startswith("nlphuji___") and arrow_files(c))), None)
        looked = [str(c) if c.name.startswith("nlphuji___") else str(c / s)
                  for c in task.candidates(data_dir) for s in splits]
        out.append(Planned(task, found, looked))
    return out


def missing_report(planned: list[Planned]) -> str:
    lines = [f"  {p.task.key} ({p.task.name}): looked for {', '.join(p.looked_for)}" for p in planned if p.root is None]
    return f"{len(lines)} of {len(planned)} tasks have no data:\n" + "\n".join(lines) if lines else ""


class ResultsLog:
    """The results JSONL: a header line naming the model and suite, then one line per finished task.
    A log written for another model or suite is refused, never appended to or replaced."""

    def __init__(self, path: str | Path, model: str, suite: str) -> None:
        self.path, self.header = Path(path), {"model": model, "suite": suite}
        self.done: dict[str, dict] = {}
        if self.path.is_file():
            lines = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
            if not lines or lines[0].get("header") != self.header:
                raise ValueError(f"{self.path}: a results log of another run ({lines[0] if lines else 'empty'}); "
                                 f"this run is {self.header}: give another --output-prefix or remove the file")
            self.done = {row["key"]: row for row in lines[1:]}

    def append(self, row: dict) -> None:
        if rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.is_file()
        with open(self.path, "a") as f:
            if new:
                f.write(strict_json({"header": self.header}) + "\n")
            f.write(strict_json(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[row["key"]] = row


@dataclass
class SuiteScorer:
    """Scores one task at a time with a model in eval mode (every rank calls every method)."""

    model: nn.Module
    transform: object
    tokenizer: object
    device: torch.device
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    probe: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    text_batch_size: int = 256

    def _features(self, data: WebDatasetSplit, desc: str):
        feats, targets = image_features(self.model, data, self.loader, self.device, desc=desc)
        ok = targets[:, 1].bool()
        bad = [data.key(i) for i in (~ok).nonzero().flatten().tolist()]
        return feats[ok].cpu(), targets[ok].cpu(), bad

    def score(self, task: SuiteTask, root: Path) -> dict:
        if task.kind in (CLASSIFY, WILDS):
            metrics, bad = self._zeroshot(task, root)
        elif task.kind == RETRIEVAL:
            metrics, bad = self._retrieval(task, root)
        elif task.kind == LINEAR_PROBE:
            metrics, bad = self._linear_probe(root)
        elif task.kind == WINOGAVIL:
            metrics, bad = self._winogavil(task, root)
        else:
            raise ValueError(f"{task.key}: tasks of kind {task.kind!r} are not scored by this tool")
        metrics["corrupt_images"] = len(bad)
        metrics["corrupt_keys"] = bad[:100]
        metrics["main_metric"] = metrics.get(task.main_metric)
        return metrics

    def _zeroshot(self, task: SuiteTask, root: Path):
        prompts = open_task_dir(root, need_prompts=True)
        data = WebDatasetSplit(root, "test", self.transform)
        feats, targets, bad = self._features(data, task.name)
        classifier = build_zeroshot_classifier(self.model, prompts.classnames, prompts.templates, self.tokenizer,
                                               self.device, self.text_batch_size).cpu()
        logits, labels = feats @ classifier, targets[:, 0]
        if labels.numel() and (labels.min() < 0 or labels.max() >= len(prompts.classnames)):
            raise ValueError(f"{root}: labels outside the {len(prompts.classnames)} names of classnames.txt")
        metrics = classification_metrics(logits, labels)
        if task.kind == WILDS:
            metrics.update(wilds_metrics(task.key, logits, labels, targets[:, 2:]))
        return metrics, bad

    def _retrieval(self, task: SuiteTask, root: Path):
        data = (WebDatasetSplit(root, "test", self.transform) if (root / "test").is_dir()
                else ArrowRetrievalSplit(root, self.transform))
        if data.kind != "retrieval":
            raise ValueError(f"{root}: dataset_type.txt must say 'retrieval' for task {task.key}")
        feats, targets, bad = self._features(data, task.name)
        kept = targets[:, 0].tolist()  # the images that decoded, in order
        captions, owner = [], []
        for position, index in enumerate(kept):
            for caption in data.captions(index):
                captions.append(task.caption_prefix + caption)
                owner.append(position)
        # Captions outnumber images about 5:1, so their encoding is sharded over ranks too.
        texts = self._sharded_texts(captions, f"{task.name} captions")
        return retrieval_metrics(retrieval_recall(feats, texts, torch.tensor(owner))), bad

    def _sharded_texts(self, texts: list[str], desc: str) -> torch.Tensor:
        indices, n_real = padded_shard(len(texts))
        local = encode_texts(self.model, [texts[i] for i in indices], self.tokenizer, self.device,
                             self.text_batch_size, desc=desc)[:n_real]
        return all_gather_rows(local, len(texts)).cpu()

    def _winogavil(self, task: SuiteTask, root: Path):
        data = WinoGavilSplit(root, self.transform)
        feats, targets = image_features(self.model, data, self.loader, self.device, desc=task.name)
        ok = targets[:, 1].bool().cpu()
        cues = self._sharded_texts([cue_prompt(c) for c in data.cues], f"{task.name} cues")
        metrics, skipped = score_instances(data, feats.cpu(), ok, cues)
        metrics["skipped_instances"] = skipped
        return metrics, [data.key(i) for i in (~ok).nonzero().flatten().tolist()]

    def _linear_probe(self, root: Path):
        train_feats, train_targets, bad_train = self._features(WebDatasetSplit(root, "train", self.transform), "train")
        feats, targets, bad = self._features(WebDatasetSplit(root, "test", self.transform), "test")
        result = linear_probe(train_feats, train_targets[:, 0], feats, targets[:, 0], self.probe)
        metrics = {"acc1": result["top1"], "acc5": result["top5"], "mean_per_class_recall": result["mean_per_class"],
                   "n": result["n"], "n_train": len(train_targets), "lam": result["lam"]}
        return metrics, bad_train + bad


def run_tasks(scorer: SuiteScorer, planned: list[Planned], log: ResultsLog | None = None) -> list[dict]:
    """Scores the planned tasks that have data and no line in ``log``; returns a row per planned
    task (``missing`` rows for those without data)."""
    rows = []
    for p in planned:
        task = p.task
        if p.root is None:
            rows.append({"key": task.key, "dataset": task.name, "main_metric": task.main_metric, "missing": True,
                         "looked_for": p.looked_for, "metrics": {}})
            continue
        if log is not None and task.key in log.done:
            rows.append(log.done[task.key])
            continue
        start = time.perf_counter()
        metrics = scorer.score(task, p.root)
        row = {"key": task.key, "dataset": task.name, "main_metric": task.main_metric, "metrics": metrics,
               "data": str(p.root), "seconds": round(time.perf_counter() - start, 2)}
        if log is not None:
            log.append(row)
        rows.append(row)
    return rows


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def suite_outputs(prefix: str | Path) -> dict[str, Path]:
    prefix = Path(prefix)
    return {ext: prefix.with_name(prefix.name + f".{ext}") for ext in ("jsonl", "json", "md")}


def output_prefix(model: str, suite: Suite, given: str | None) -> Path:
    """``b32.safetensors`` -> ``b32.<suite>`` beside it (a registry name: in the working directory)."""
    if given:
        return Path(given)
    path = Path(model)
    return path.with_name(path.name.removesuffix(".safetensors") + f".{suite.name}")


def evaluate_suite(suite: Suite, task_keys: list[str] | None, data_dir: str | Path, model_name: str,
                   prefix: str | Path | None, load, loader: LoaderConfig, probe: LinearProbeConfig,
                   device: torch.device, print_fn=print) -> dict:
    """The whole of ``tools/evaluate.py --suite``: plan (missing data reported before ``load()``
    builds ``(model, eval_transform, tokenizer)``), resume from the JSONL, score, aggregate, and
    write ``PREFIX.json`` and ``PREFIX.md`` from rank 0. Returns the results record."""
    from rwkvclip_dist.eval.aggregate import aggregate, markdown_table

    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir}: no such directory")
    tasks = suite.select(task_keys)
    planned = plan(tasks, data_dir)
    missing = missing_report(planned)
    if all(p.root is None for p in planned):
        raise FileNotFoundError(f"--data-dir {data_dir}: no task of suite {suite.name!r} has data there; {missing}")
    if missing and rank() == 0:
        print_fn(f"evaluate.py: suite {suite.name}: {missing}\n  the averages will be reported as partial")
    outputs = suite_outputs(output_prefix(model_name, suite, None if prefix is None else str(prefix)))
    if not outputs["jsonl"].exists():
        clash = [str(p) for k, p in outputs.items() if k != "jsonl" and p.exists()]
        if clash:
            raise FileExistsError(f"{clash[0]} exists without its results log {outputs['jsonl']}: "
                                  f"give another --output-prefix rather than replace it")
    log = ResultsLog(outputs["jsonl"], model_name, suite.name)
    if log.done and rank() == 0:
        print_fn(f"evaluate.py: resuming from {outputs['jsonl']}: {len(log.done)} task(s) already scored")
    barrier()  # every rank has read the log before rank 0 appends to it
    model, transform, tokenizer = load()
    rows = run_tasks(SuiteScorer(model, transform, tokenizer, device, loader, probe), planned, log)
    scores = {r["dataset"]: r["metrics"].get("main_metric") for r in rows if not r.get("missing")}
    aggregates = aggregate(suite, tasks, scores)
    record = {"model": model_name, "suite": suite.name, "data_dir": str(data_dir),
              "complete": not any(a["partial"] for a in aggregates.values()),
              "aggregates": aggregates, "tasks": rows}
    if rank() == 0:
        outputs["json"].write_text(strict_json(record, indent=1) + "\n")
        table = markdown_table(suite, rows, aggregates)
        outputs["md"].write_text(table)
        print_fn(table)
        print_fn(f"results written to {outputs['json']} and {outputs['md']}")
    barrier()
    return record
