"""Evaluation library and tools/evaluate.py: zero-shot, retrieval and linear probe on small image
folders the tests make and on the digits demo data, single-process and across 2 gloo ranks."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from rwkvclip_dist.eval.classnames import load_class_prompts
from rwkvclip_dist.eval.linear_probe import LinearProbeConfig, linear_probe
from rwkvclip_dist.eval.retrieval import retrieval_recall
from rwkvclip_dist.eval.retrieval_data import load_retrieval_annotations
from rwkvclip_dist.pretrained import load_model, save_pretrained
from conftest import PYTHON, REPO, dist_env
from tool_loader import tool_main

pytestmark = pytest.mark.timeout(120)


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 4 images of plain colours with a little noise, as an ImageFolder."""
    root = tmp_path_factory.mktemp("folder")
    gen = torch.Generator().manual_seed(0)
    for name, rgb in COLOURS.items():
        (root / name).mkdir()
        for i in range(4):
            pixels = (torch.tensor(rgb).view(1, 1, 3) + torch.randint(-20, 21, (32, 32, 3), generator=gen)).clamp(0, 255)
            Image.fromarray(pixels.to(torch.uint8).numpy()).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    return save_pretrained(load_model("tiny"), tmp_path_factory.mktemp("m") / "tiny.safetensors")


def _brute_force_ranks(img, txt, owner):
    sims = img @ txt.t()
    i2t = [min(int((sims[i] > sims[i, j]).sum()) for j in range(len(owner)) if owner[j] == i) for i in range(len(img))]
    t2i = [int((sims[:, j] > sims[owner[j], j]).sum()) for j in range(len(owner))]
    return torch.tensor(i2t), torch.tensor(t2i)


def test_retrieval_recall_matches_brute_force():
    gen = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(30, 16, generator=gen), dim=-1)
    owner = torch.arange(30).repeat_interleave(3)
    txt = F.normalize(img[owner] + 0.9 * torch.randn(90, 16, generator=gen), dim=-1)
    result = retrieval_recall(img, txt, owner, chunk_size=7)
    i2t, t2i = _brute_force_ranks(img, txt, owner)
    for k in (1, 5, 10):
        assert result[f"i2t_R@{k}"] == pytest.approx(100 * (i2t < k).double().mean().item())
        assert result[f"t2i_R@{k}"] == pytest.approx(100 * (t2i < k).double().mean().item())
    assert 0 < result["t2i_R@1"] < 100  # the noise level makes the task neither trivial nor hopeless


def test_retrieval_annotation_layouts_agree(tmp_path, folder):
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))[:3]
    caps = [[f"picture {i}", f"image {i}"] for i in range(3)]
    layouts = {
        "coco.json": {"images": [{"id": 10 + i, "file_name": f} for i, f in enumerate(files)],
                      "annotations": [{"image_id": 10 + i, "caption": c} for i in range(3) for c in caps[i]]},
        "karpathy.json": {"images": [{"filename": f, "split": "test", "sentences": [{"raw": c} for c in caps[i]]}
                                     for i, f in enumerate(files)] + [{"filename": files[0], "split": "train", "sentences": []}]},
        "flat.json": [{"image": f, "caption": caps[i]} for i, f in enumerate(files)],
    }
    sets = []
    for name, data in layouts.items():
        (tmp_path / name).write_text(json.dumps(data))
        sets.append(load_retrieval_annotations(tmp_path / name, folder, caption_prefix="a photo of "))
    assert all(s == sets[0] for s in sets)
    assert sets[0].captions[0] == "a photo of picture 0" and sets[0].text_to_image == [0, 0, 1, 1, 2, 2]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": files[0]}]))
    with pytest.raises(ValueError, match="entry 0 lacks 'image' or 'caption'"):
        load_retrieval_annotations(tmp_path / "bad.json", folder)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_linear_probe_separates_clusters(backend):
    gen = torch.Generator().manual_seed(2)
    centres = 2.0 * torch.randn(4, 12, generator=gen)
    labels = torch.randint(0, 4, (260,), generator=gen)
    feats = centres[labels] + torch.randn(260, 12, generator=gen)
    config = LinearProbeConfig(backend=backend, coarse_log10_lams=[-4.0, -2.0, 0.0, 2.0], refine_steps=1,
                               max_iter=100)
    result = linear_probe(feats[:160], labels[:160], feats[160:], labels[160:], config)
    nearest_centre = (torch.cdist(feats[160:], centres).argmin(1) == labels[160:]).double().mean().item()
    assert result["top1"] >= nearest_centre - 0.05  # as good as the Bayes-like nearest-centre rule
    assert result["sweep"]["2"] < max(result["sweep"].values())  # over-regularising is visibly worse
    assert result["n"] == 100


def test_shipped_templates():
    assert len(load_class_prompts("imagenet")["templates"]) == 80
    assert len(load_class_prompts("cifar100")["classnames"]) == 100
    for name in ("caltech101", "aircraft", "flowers", "pets"):  # SPEC section 9
        assert load_class_prompts(name)["metric"] == "mean_per_class"
    for name in ("cifar10", "food101", "sun397", "cars", "dtd"):
        assert load_class_prompts(name)["metric"] == "top1"
    with pytest.raises(FileNotFoundError, match="no template set"):
        load_class_prompts("mnist-typo")


def test_evaluate_cli_all_tasks_on_image_folder(tmp_path, folder, model_file, capsys):
    main = tool_main("evaluate")
    flat = [{"image": p.relative_to(folder).as_posix(), "caption": f"a {p.parent.name} square"}
            for p in sorted(folder.rglob("*.png"))]
    (tmp_path / "captions.json").write_text(json.dumps(flat))
    (tmp_path / "prompts.json").write_text(json.dumps({"templates": ["a {c} square.", "the colour {c}."]}))
    out = tmp_path / "results.json"
    code = main(["--model", str(model_file), "--task", "zeroshot", "--task", "linear_probe", "--task", "retrieval",
                 "--data", str(folder), "--train-data", str(folder), "--templates", str(tmp_path / "prompts.json"),
                 "--annotations", str(tmp_path / "captions.json"), "--image-root", str(folder),
                 "--caption-prefix", "a photo of ", "--workers", "0", "--probe-max-iter", "50", "--output", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert results["zeroshot"]["n"] == 12 and results["zeroshot"]["top5"] is None  # 3 classes
    assert results["retrieval"]["n_images"] == 12 and results["retrieval"]["n_texts"] == 12
    assert results["linear_probe"]["n"] == 12
    assert "i2t_R@1" in capsys.readouterr().out


def test_evaluate_under_srun_forms_one_process_group(tmp_path, folder, model_file):
    """The tool reads its ranks as training does (parallel/launch_env.py): two processes started with
    srun's variables alone (no RANK/WORLD_SIZE) split the images and rank 0 alone writes the results.
    (Before, each ran the whole set by itself and both wrote, or the second refused the first's file.)"""
    from rwkvclip_dist.parallel.launch_env import free_port

    (tmp_path / "prompts.json").write_text(json.dumps({"templates": ["a {c} square."]}))
    out = tmp_path / "results.json"
    cmd = [PYTHON, str(REPO / "tools" / "evaluate.py"), "--model", str(model_file), "--task", "zeroshot",
           "--data", str(folder), "--templates", str(tmp_path / "prompts.json"), "--workers", "0",
           "--output", str(out)]
    port = str(free_port())
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dist_env(SLURM_PROCID=str(r), SLURM_LOCALID=str(r), SLURM_NTASKS="2",
                                           SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost",
                                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outputs = [p.communicate(timeout=100)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert ["results written to" in o for o in outputs] == [True, False], outputs
    assert json.loads(out.read_text())["results"]["zeroshot"]["n"] == 12


def _rank_zeroshot(rank, world, port, root, model_path, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    classifier, metrics, feats = _zeroshot_on(root, model_path)
    torch.save({"classifier": classifier, "metrics": metrics, "feats": feats}, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


def _zeroshot_on(root, model_path):
    from torch.utils.data import Subset

    from rwkvclip_dist.data.shards.demo_digits import CLASSNAMES, TEMPLATES
    from rwkvclip_dist.eval import build_zeroshot_classifier, zeroshot_scores
    from rwkvclip_dist.eval.datasets import MDSLabelledImages
    from rwkvclip_dist.eval.features import LoaderConfig, image_features
    from rwkvclip_dist.pretrained import create_model_and_transforms, get_tokenizer

    model, _, tf = create_model_and_transforms(None, pretrained=model_path)
    data = Subset(MDSLabelledImages(f"{root}/heldout", tf), range(12))
    classifier = build_zeroshot_classifier(model, CLASSNAMES, TEMPLATES[:1], get_tokenizer(model_path))
    feats, labels = image_features(model, data, LoaderConfig(batch_size=8, num_workers=0))
    metrics = zeroshot_scores(model, feats, labels, CLASSNAMES, TEMPLATES[:1], get_tokenizer(model_path))
    # 7 classes and 11 images split unevenly over 2 ranks: exercises the padded shards.
    uneven = build_zeroshot_classifier(model, CLASSNAMES[:7], TEMPLATES[:1], get_tokenizer(model_path))
    feats = image_features(model, Subset(data, range(11)), LoaderConfig(batch_size=4, num_workers=0))
    return classifier, metrics, (uneven, *feats)


@pytest.mark.slow
def test_zeroshot_two_ranks_equals_one_process(tmp_path, model_file):
    from rwkvclip_dist.data.shards.demo_digits import ensure_demo_data

    root = ensure_demo_data(str(tmp_path / "digits"))
    single_clf, single, single_extra = _zeroshot_on(root, str(model_file))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_zeroshot, args=(2, port, root, str(model_file), str(tmp_path)), nprocs=2)
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        clf, metrics = saved["classifier"], saved["metrics"]
        for got, want in zip(saved["feats"], single_extra):
            torch.testing.assert_close(got, want)
        torch.testing.assert_close(clf, single_clf)  # classes were split over ranks, then gathered
        assert metrics["n"] == 12 == single["n"]
        assert metrics == pytest.approx(single)


def test_confusion_counts_sum_over_batches_to_global_metrics():
    """Counts of two halves add up to the counts of the whole (what the all-reduce relies on)."""
    from rwkvclip_dist.eval.metrics import confusion_counts, summarise_counts

    logits = torch.tensor([[3.0, 1, 0, 0, 0, 0], [0, 2, 1, 0, 0, 0], [0, 0, 0, 1, 5, 0], [1, 0, 0, 0, 0, 2]])
    labels = torch.tensor([0, 2, 4, 0])
    whole = summarise_counts(confusion_counts(logits, labels), 6)
    halves = confusion_counts(logits[:2], labels[:2]) + confusion_counts(logits[2:], labels[2:])
    assert summarise_counts(halves, 6) == whole
    # sample 0 and 2 are right; sample 1's label ranks 2nd; sample 3's label ranks 2nd.
    assert whole["top1"] == 0.5 and whole["top5"] == 1.0 and whole["n"] == 4
    assert whole["mean_per_class"] == pytest.approx((0.5 + 0.0 + 1.0) / 3)  # classes 0, 2 and 4 occur
    with pytest.raises(ValueError, match=r"labels \[7\] are outside"):
        confusion_counts(logits[:1], torch.tensor([7]))


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_in_loop_zeroshot_equals_the_evaluate_tool_on_the_same_checkpoint(tmp_path, demo_data, clean_shm):
    """One zero-shot path: a 2-rank training run's in-loop figure and tools/evaluate.py's figure on
    the converted checkpoint of that run, same data, 2 ranks each. 181 held-out digits divide neither
    the global eval batch (2 x 64) nor the ranks, so padding must not count any image twice."""
    from streaming import MDSWriter

    from conftest import REPO, dist_env, run_checked, launch_cmd, train_args
    from rwkvclip_dist.data.columns import columns
    from rwkvclip_dist.data.shards.demo_digits import _rows

    heldout, classes = tmp_path / "heldout181", demo_data / "zeroshot.json"
    with MDSWriter(out=str(heldout), columns=columns(with_label=True), compression="zstd") as writer:
        for row in _rows("heldout")[:181]:
            writer.write(row)
    run = tmp_path / "run"
    run_checked(launch_cmd(2, *train_args(run, demo_data, "train.steps=6", "checkpoint.every_steps=0",
                                            f"eval.zeroshot=[{{data: {heldout}, classes: {classes}, "
                                            f"batch_size: 64, num_workers: 0}}]")), timeout=400, env=dist_env())
    in_loop = json.loads((run / "metrics.json").read_text())["evals"]["6"]
    assert in_loop["zeroshot_n"] == 181

    converted = tmp_path / "run.safetensors"
    assert tool_main("convert_checkpoint")(["from-zero", str(run / "checkpoints"), str(converted)]) == 0
    out = tmp_path / "eval.json"
    run_checked(launch_cmd(2, str(REPO / "tools" / "evaluate.py"), "--model", str(converted), "--task", "zeroshot",
                             "--data", str(heldout), "--templates", str(classes), "--batch-size", "64",
                             "--workers", "0", "--output", str(out)), timeout=300, env=dist_env())
    tool = json.loads(out.read_text())["results"]["zeroshot"]
    assert tool["n"] == 181
    for key in ("top1", "top5", "mean_per_class"):
        assert tool[key] == in_loop[f"zeroshot_{key}"], key
