"""The DataComp and paper suites (tools/evaluate.py --suite) on sets made here in CLIP_benchmark's
published webdataset layout (tests/eval_layouts.py), checked against the reference code:

- zero-shot classification: DataComp's own path (clip_benchmark's ``build_dataset("wds/...")``
  reading our tars, ``zero_shot_classifier``, ``run_classification``, ``accuracy`` and sklearn's
  ``balanced_accuracy_score``), run on our model loaded through ``rwkvclip_dist.pretrained``;
- retrieval: clip_benchmark's ``zeroshot_retrieval.evaluate`` on the same tars;
- WILDS and fairness group metrics: the ``wilds`` package's ``Accuracy``/``F1``/``Recall`` metrics
  and ``CombinatorialGrouper``; DataComp's evaluator classes live in its repository's
  ``eval_utils`` (not an installable package), so the groupings they configure (which metadata
  column, which metric, top-5 for Dollar Street, the FMoW year and region split) are set up here
  with the wilds objects directly;
- WinoGAViL: against DataComp's formula in tests/test_eval_winogavil.py (here: part of the suite run);
- the averages: DataComp's ``aggregate_scores.py`` is a script, not importable; its documented
  formula (ImageNet alone, plain means over the ImageNet-shift, VTAB and retrieval groups and over
  all 38) is reproduced in ``test_aggregation_is_datacomps_formula``.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eval_layouts import classification_set, hf_cache_winogavil_set, retrieval_set
from rwkvclip_dist.eval.aggregate import aggregate
from rwkvclip_dist.eval.features import LoaderConfig
from rwkvclip_dist.eval.suite import DATACOMP, PAPER, get_suite
from rwkvclip_dist.eval.suite_metrics import WILDS_LAYOUT, wilds_metrics
from rwkvclip_dist.eval.suite_runner import SuiteScorer
from rwkvclip_dist.pretrained import create_model_and_transforms, get_tokenizer, load_model, save_pretrained
from tool_loader import tool_main

pytestmark = pytest.mark.timeout(300)
WINO_CANDIDATES = (5, 6, 10, 12, 5, 10, 12, 6, 10)  # row 1 has a corrupt image


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(load_model("tiny"), tmp_path_factory.mktemp("m") / "tiny.safetensors")


@pytest.fixture(scope="module")
def loaded(model_file):
    model, _, tf = create_model_and_transforms(None, pretrained=model_file)
    return model, tf, get_tokenizer(str(model_file))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A DataComp download with 6 of the 38 tasks present (a corrupt image in Pets and in WinoGAViL)."""
    root = tmp_path_factory.mktemp("datacomp")
    classification_set(root / "wds_cifar10_test", 30, 6, seed=1)
    classification_set(root / "wds_vtab-pets_test", 24, 4, seed=2, corrupt=(5,))
    fmow = np.stack([np.arange(26) % 4, np.arange(26) % 3, np.zeros(26, dtype=int)], axis=1)
    classification_set(root / "wds_wilds-fmow_test", 26, 5, seed=3, metadata=fmow)
    classification_set(root / "wds_geode_test", 22, 5, seed=4, metadata=np.stack([np.arange(22) % 3, np.arange(22) % 5], 1))
    retrieval_set(root / "wds_flickr30k", 12, seed=5)
    hf_cache_winogavil_set(root / "hf_cache", WINO_CANDIDATES, seed=6, corrupt=((1, 2),))
    return root


def test_suite_tables():
    assert len(DATACOMP) == 38 and len({t.name for t in DATACOMP}) == 38
    groups = {}
    for t in DATACOMP:
        for g in t.groups:
            groups[g] = groups.get(g, 0) + 1
    assert groups == {"ImageNet dist. shifts": 6, "VTAB": 13, "Retrieval": 3}
    kinds = [t.kind for t in PAPER]
    assert kinds.count("classify") == 11 and kinds.count("linear_probe") == 10 and kinds.count("retrieval") == 2
    with pytest.raises(ValueError, match="not tasks of suite"):
        get_suite("datacomp").select(["cifar11"])


def _clip_benchmark_classification(root, model, tf, tokenizer):
    """DataComp's eval_utils/wds_eval.py path, with our model instead of an open_clip one."""
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zsc
    from sklearn.metrics import balanced_accuracy_score

    dataset = build_dataset("wds/x", root=str(root), transform=tf, split="test", download=False)
    loader = torch.utils.data.DataLoader(dataset.batched(8), batch_size=None, num_workers=0)
    classifier = zsc.zero_shot_classifier(model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    logits, target = zsc.run_classification(model, classifier, loader, "cpu", amp=False)
    acc1, acc5 = zsc.accuracy(logits, target, topk=(1, 5)) if len(dataset.classes) >= 5 else (*zsc.accuracy(logits, target), None)
    return {"acc1": acc1, "acc5": acc5,
            "mean_per_class_recall": balanced_accuracy_score(target, logits.argmax(1))}, logits, target


def test_zeroshot_equals_clip_benchmark_and_datacomp(loaded, data_dir):
    model, tf, tokenizer = loaded
    task = get_suite("datacomp").select(["cifar10"])[0]
    ours = SuiteScorer(model, tf, tokenizer, torch.device("cpu"), LoaderConfig(8, 0)).score(task, data_dir / "wds_cifar10_test")
    ref, _, _ = _clip_benchmark_classification(data_dir / "wds_cifar10_test", model, tf, tokenizer)
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, abs=1e-9), key
    assert ours["n"] == 30 and ours["main_metric"] == ours["acc1"] and ours["corrupt_images"] == 0


def test_retrieval_equals_clip_benchmark(loaded, data_dir):
    from clip_benchmark.datasets.builder import build_dataset, image_captions_collate_fn
    from clip_benchmark.metrics import zeroshot_retrieval as zsr

    model, tf, tokenizer = loaded
    task = get_suite("datacomp").select(["Flickr"])[0]
    ours = SuiteScorer(model, tf, tokenizer, torch.device("cpu"), LoaderConfig(4, 0)).score(task, data_dir / "wds_flickr30k")
    dataset = build_dataset("wds/flickr", root=str(data_dir / "wds_flickr30k"), transform=tf, split="test",
                            download=False, task="zeroshot_retrieval")
    loader = torch.utils.data.DataLoader(dataset.batched(4, collation_fn=image_captions_collate_fn), batch_size=None)
    ref = zsr.evaluate(model, loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for key, value in ref.items():  # clip_benchmark averages in float32: equal counts, float32 rounding
        assert ours[key] == pytest.approx(value, abs=1e-6), key
    assert ours["n"] == 12 and ours["n_texts"] == 60
    assert ours["mean_recall@1"] == pytest.approx(0.5 * (ref["image_retrieval_recall@1"] + ref["text_retrieval_recall@1"]))


class _Meta:
    """The part of a WILDS dataset a CombinatorialGrouper reads."""

    def __init__(self, fields, metadata):
        self.metadata_fields, self.metadata_array, self.metadata_map = list(fields), metadata, None


def _wilds_reference(key, logits, labels, metadata):
    import wilds.common.metrics.metric as wilds_metric
    from wilds.common.grouper import CombinatorialGrouper
    from wilds.common.metrics.all_metrics import F1, Accuracy, Recall

    def avg_over_groups(v, g, n_groups):  # wilds' own needs torch_scatter; DataComp patches it the same way
        counts = torch.bincount(g, minlength=n_groups).float()
        return torch.zeros(n_groups).index_add_(0, g, v.float()) / counts, counts

    wilds_metric.avg_over_groups = avg_over_groups
    layout = WILDS_LAYOUT[key]
    pred = logits.argmax(1)
    if "group_by" not in layout:
        out = {}
        for metric in (Accuracy(), Recall(average="macro"), F1(average="macro")):
            out.update({k: float(v) for k, v in metric.compute(pred, labels).items()})
        return out
    name, k = layout["metric"]
    if k == 1:
        metric, y_pred = Accuracy(name=name), pred
    else:  # DataComp's top-5 accuracy: an element is right when the label is among the k predictions
        metric, y_pred = Accuracy(name=name), (logits.topk(k, 1).indices == labels[:, None]).any(1).long()
        labels = torch.ones_like(labels)
    out = {key2: float(v) for key2, v in metric.compute(y_pred, labels).items()}
    for field in [layout["group_by"], layout.get("also_by")]:
        if field is None:
            continue
        grouper = CombinatorialGrouper(_Meta(layout["fields"], metadata), [field])
        group = metric.compute_group_wise(y_pred, labels, grouper.metadata_to_group(metadata), grouper.n_groups)
        for g in range(grouper.n_groups):
            out[f"{name}_{grouper.group_field_str(g)}"] = float(group[metric.group_metric_field(g)])
            out[f"count_{grouper.group_field_str(g)}"] = float(group[metric.group_count_field(g)])
        worst = f"{name}_worst_{field}" if field == layout.get("also_by") else layout.get("worst_name", f"{name}_wg")
        out[worst] = float(group[metric.worst_group_metric_field])
    return out


@pytest.mark.parametrize("key", sorted(WILDS_LAYOUT))
def test_wilds_and_fairness_metrics_equal_the_wilds_package(key):
    gen = torch.Generator().manual_seed(len(key))
    n, n_classes = 200, 7
    labels = torch.randint(0, n_classes, (n,), generator=gen)
    logits = torch.randn(n, n_classes, generator=gen) + 1.5 * torch.nn.functional.one_hot(labels, n_classes)
    fields = WILDS_LAYOUT[key]["fields"]
    metadata = torch.randint(0, 4, (n, len(fields)), generator=gen)
    metadata[metadata[:, 0] == 2, 0] = 3  # an empty group in the middle: left out of the worst group
    ours, ref = wilds_metrics(key, logits, labels, metadata), _wilds_reference(key, logits, labels, metadata)
    for name, value in ref.items():
        if math.isnan(value):  # an empty group (0/0 under DataComp's avg_over_groups)
            assert ours[name] is None, name
        else:
            assert ours[name] == pytest.approx(value, abs=1e-6), name
    assert set(ref) <= set(ours)


def test_aggregation_is_datacomps_formula():
    rng = np.random.default_rng(0)
    scores = {t.name: float(rng.random()) for t in DATACOMP}
    suite = get_suite("datacomp")
    got = aggregate(suite, list(DATACOMP), scores)
    shifts = ["ImageNet Sketch", "ImageNet v2", "ImageNet-A", "ImageNet-O", "ImageNet-R", "ObjectNet"]
    vtab = ["Caltech-101", "CIFAR-100", "CLEVR Counts", "CLEVR Distance", "Describable Textures", "EuroSAT",
            "KITTI Vehicle Distance", "Oxford Flowers-102", "Oxford-IIIT Pet", "PatchCamelyon", "RESISC45", "SVHN",
            "SUN397"]
    expected = {"ImageNet 1k": scores["ImageNet 1k"], "ImageNet dist. shifts": np.mean([scores[d] for d in shifts]),
                "VTAB": np.mean([scores[d] for d in vtab]),
                "Retrieval": np.mean([scores[d] for d in ("Flickr", "MSCOCO", "WinoGAViL")]),
                "Average": np.mean(list(scores.values()))}
    assert {k: v["score"] for k, v in got.items()} == pytest.approx(expected)
    assert not any(v["partial"] for v in got.values())
    del scores["WinoGAViL"]
    partial = aggregate(suite, list(DATACOMP), scores)
    assert partial["Average"]["partial"] and partial["Average"]["n"] == 37 and partial["Retrieval"]["of"] == 3
    assert not partial["VTAB"]["partial"]


def _run_suite(model_file, data_dir, prefix, *extra):
    return tool_main("evaluate")(["--model", str(model_file), "--suite", "datacomp", "--data-dir", str(data_dir),
                                  "--output-prefix", str(prefix), "--workers", "0", "--batch-size", "8", *extra])


def test_datacomp_suite_end_to_end(tmp_path, model_file, data_dir, loaded, capsys):
    assert _run_suite(model_file, data_dir, tmp_path / "r") == 0
    out = capsys.readouterr().out
    assert "32 of 38 tasks have no data" in out and str(data_dir / "wds_imagenet1k_test" / "test") in out
    assert out.index("have no data") < out.index("| task |")  # listed before anything was scored
    record = json.loads((tmp_path / "r.json").read_text())
    rows = {r["dataset"]: r for r in record["tasks"]}
    assert not record["complete"] and record["aggregates"]["Average"] == pytest.approx(
        {"score": np.mean([rows[n]["metrics"]["main_metric"] for n in ("CIFAR-10", "Oxford-IIIT Pet", "FMoW",
                                                                       "GeoDE", "Flickr", "WinoGAViL")]),
         "n": 6, "of": 38, "partial": True})
    assert record["aggregates"]["Retrieval"]["n"] == 2
    assert rows["WinoGAViL"]["metrics"]["main_metric"] == rows["WinoGAViL"]["metrics"]["jaccard_score_10-12"]
    assert rows["WinoGAViL"]["metrics"]["skipped_instances"] == 1
    assert "(partial: 6 of 38)" in (tmp_path / "r.md").read_text()
    pets = rows["Oxford-IIIT Pet"]["metrics"]
    assert pets["corrupt_images"] == 1 and pets["corrupt_keys"] == ["s0000005"] and pets["n"] == 23
    assert "23 (1 corrupt)" in (tmp_path / "r.md").read_text()
    assert rows["FMoW"]["metrics"]["main_metric"] == rows["FMoW"]["metrics"]["acc_worst_region"]
    assert rows["GeoDE"]["metrics"]["main_metric"] == rows["GeoDE"]["metrics"]["acc_wg"]
    assert "count_region:3" in rows["FMoW"]["metrics"]
    # The same numbers as DataComp's path on the sets the reference can read (no corrupt image).
    model, tf, tokenizer = loaded
    ref, _, _ = _clip_benchmark_classification(data_dir / "wds_cifar10_test", model, tf, tokenizer)
    assert rows["CIFAR-10"]["metrics"]["acc1"] == pytest.approx(ref["acc1"])
    # Another model's results log is refused, not appended to or replaced.
    other = tmp_path / "other.safetensors"
    other.write_bytes(model_file.read_bytes())
    (tmp_path / "other.json").write_text(model_file.with_suffix(".json").read_text())
    assert tool_main("evaluate")(["--model", str(other), "--suite", "datacomp", "--data-dir", str(data_dir),
                                  "--output-prefix", str(tmp_path / "r"), "--workers", "0"]) == 2
    assert "a results log of another run" in capsys.readouterr().err


def test_paper_suite_linear_probe_and_subset(tmp_path, model_file):
    root = tmp_path / "wds"
    classification_set(root / "wds_cifar10", 30, 4, seed=7, split="train")
    classification_set(root / "wds_cifar10", 16, 4, seed=8, split="test")
    code = tool_main("evaluate")(["--model", str(model_file), "--suite", "paper", "--data-dir", str(root),
                                  "--tasks", "cifar10,probe/cifar10", "--output-prefix", str(tmp_path / "p"),
                                  "--workers", "0", "--probe-max-iter", "20"])
    assert code == 0
    record = json.loads((tmp_path / "p.json").read_text())
    assert [r["key"] for r in record["tasks"]] == ["cifar10", "probe/cifar10"]
    probe = record["tasks"][1]["metrics"]
    assert probe["n"] == 16 and probe["n_train"] == 30 and 0 <= probe["main_metric"] <= 1
    assert record["aggregates"]["Zero-shot (11)"]["of"] == 1 and record["complete"]


SUBSET = "cifar10,vtab/pets,fairness/geode,misc/winogavil"


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory, model_file, data_dir):
    """One uninterrupted single-process run of four tasks: what the resumed and the 2-rank runs must give."""
    prefix = tmp_path_factory.mktemp("subset") / "r"
    assert _run_suite(model_file, data_dir, prefix, "--tasks", SUBSET) == 0
    return json.loads(prefix.with_suffix(".json").read_text())


def _metrics(record):
    return {r["key"]: {k: v for k, v in r["metrics"].items()} for r in record["tasks"]}


@pytest.mark.slow
def test_killed_evaluation_resumes_only_unfinished_tasks(tmp_path, model_file, data_dir, subset_run):
    from conftest import PYTHON, REPO, kill_once_written

    prefix = tmp_path / "r"
    cmd = [PYTHON, str(REPO / "tools" / "evaluate.py"), "--model", str(model_file), "--suite", "datacomp",
           "--data-dir", str(data_dir), "--output-prefix", str(prefix), "--workers", "0", "--batch-size", "8",
           "--tasks", SUBSET]
    log = prefix.with_suffix(".jsonl")
    kill_once_written(cmd, log, lines=2, timeout_s=120)  # the header and the first task
    before = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    assert 1 <= len(before) < 4 and not prefix.with_suffix(".json").exists()
    assert _run_suite(model_file, data_dir, prefix, "--tasks", SUBSET) == 0
    rows = [json.loads(line) for line in log.read_text().splitlines()[1:]]
    # Suite order, each task once.
    assert [r["key"] for r in rows] == ["cifar10", "vtab/pets", "misc/winogavil", "fairness/geode"]
    assert rows[: len(before)] == before  # finished tasks were not scored again (same timing record)
    assert _metrics(json.loads(prefix.with_suffix(".json").read_text())) == _metrics(subset_run)


@pytest.mark.slow
def test_two_ranks_equal_one_process(tmp_path, model_file, data_dir, subset_run):
    """2 gloo ranks: each encodes its shard of every set (24 and 22 images split unevenly)."""
    from conftest import REPO, dist_env, run_checked, launch_cmd

    prefix = tmp_path / "r2"
    run_checked(launch_cmd(2, str(REPO / "tools" / "evaluate.py"), "--model", str(model_file), "--suite", "datacomp",
                             "--data-dir", str(data_dir), "--output-prefix", str(prefix), "--workers", "0",
                             "--batch-size", "8", "--tasks", SUBSET), timeout=240, env=dist_env())
    two = _metrics(json.loads(prefix.with_suffix(".json").read_text()))
    one = _metrics(subset_run)
    for key in one:
        for name, value in one[key].items():
            assert two[key][name] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), (key, name)


@pytest.mark.parametrize("argv, message", [
    (["--suite", "datacomp"], "--suite needs --data-dir"),
    (["--suite", "datacomp", "--task", "zeroshot", "--data-dir", "{root}"], "give either --task"),
    (["--suite", "datacomp", "--data-dir", "{root}/nowhere"], "--data-dir {root}/nowhere: no such directory"),
    (["--suite", "paper", "--data-dir", "{root}", "--tasks", "cifar10,mnist"], "['mnist'] are not tasks of suite 'paper'"),
    (["--suite", "paper", "--data-dir", "{root}"], "no task of suite 'paper' has data there"),
])
def test_suite_argument_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("{root}", str(tmp_path)) for a in argv]
    assert tool_main("evaluate")(["--model", "tiny", *argv]) == 2
    assert message.replace("{root}", str(tmp_path)) in capsys.readouterr().err


def test_in_loop_suite_evaluation_runs_a_subset(tmp_path, model_file, data_dir, loaded):
    """``eval.suite`` in a recipe: parsed, its data planned before training, scored by the tool's
    scorer (same main metrics as ``SuiteScorer`` directly); missing data stops the run up front."""
    from conftest import DEMO_RECIPE
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.training.suite_evals import open_suite_evaluations

    override = (f"eval.suite=[{{name: dc, data_dir: {data_dir}, tasks: [cifar10, GeoDE], every_steps: 5, "
                f"batch_size: 8, num_workers: 0}}]")
    recipe = load_recipe(DEMO_RECIPE, [override], check_paths=False)
    (task,) = open_suite_evaluations(recipe.eval.suite, "tiny", {}, torch.device("cpu"))
    assert task.due(10) and not task.due(7)
    model, tf, tokenizer = loaded
    got = task.run(model)
    scorer = SuiteScorer(model, tf, tokenizer, torch.device("cpu"), LoaderConfig(8, 0))
    suite = get_suite("datacomp")
    want = {f"dc/{k}": scorer.score(suite.select([k])[0], data_dir / d)["main_metric"]
            for k, d in (("cifar10", "wds_cifar10_test"), ("fairness/geode", "wds_geode_test"))}
    assert got == pytest.approx({**want, "dc/average": sum(want.values()) / 2})
    missing = load_recipe(DEMO_RECIPE, [override.replace("cifar10, GeoDE", "imagenet1k")], check_paths=False)
    with pytest.raises(FileNotFoundError, match="wds_imagenet1k_test"):
        open_suite_evaluations(missing.eval.suite, "tiny", {}, torch.device("cpu"))


def test_retrieval_from_datacomps_hugging_face_cache(tmp_path, loaded, data_dir):
    """DataComp's download keeps Flickr in DIR/hf_cache (Arrow); made here from the webdataset copy
    of the same set, it plans as the Flickr task and scores exactly as the webdataset does. (The
    ``datasets`` library is not installed here: the cache file follows the fields DataComp's
    retr_eval.py reads, written with pyarrow.)"""
    from eval_layouts import hf_cache_retrieval_set
    from rwkvclip_dist.eval.suite_runner import plan

    name = "flickr_1k_test_image_text_retrieval"
    hf = hf_cache_retrieval_set(data_dir / "wds_flickr30k", tmp_path / "hf_cache", name)
    (planned,) = plan(get_suite("datacomp").select(["Flickr"]), tmp_path)
    assert planned.root == hf
    model, tf, tokenizer = loaded
    scorer = SuiteScorer(model, tf, tokenizer, torch.device("cpu"), LoaderConfig(4, 0))
    assert scorer.score(planned.task, hf) == scorer.score(planned.task, data_dir / "wds_flickr30k")

