"""The GPU-run tools on CPU: tools/bench_train.py at tiny size, tools/gpu_check.sh's shell and its
report, tools/make_wheelhouse.py's resolution rules (without the network: a wheel made here).

The full `tools/gpu_check.sh --cpu` run (every step, a training run included) takes minutes and
is run by hand (docs/cuda.md); these keep its pieces from breaking in CI.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
from tool_loader import tool_module

from rwkvclip_dist.model.flops import forward_flops_per_sample
from rwkvclip_dist.model.registry import get_model_config

REPO = Path(__file__).resolve().parent.parent


def test_bench_train_tiny_on_cpu(tmp_path, capsys):
    """One timed step of each tiny model with and without checkpointing: the table, the JSON file,
    training FLOPs of 4x (checkpointing) and 3x the analytic forward, the Bi-WKV calls (recomputation
    included) and the profile of the profiled case."""
    bench = tool_module("bench_train")
    out = tmp_path / "bench.json"
    bench.main(["--tiny", "--cases", "rwkv-tiny:32:ckpt", "vit-tiny:32", "--steps", "1", "--warmup", "1",
                "--batch", "2", "--profile", "rwkv-tiny:32:ckpt", "--profile-top", "3", "--out", str(out)])
    data = json.loads(out.read_text())
    rwkv, vit = data["results"]
    assert data["device"] == "CPU" and data["precision"] == "fp32"
    assert rwkv["status"] == vit["status"] == "ok" and rwkv["images_per_s"] > 0 and vit["images_per_s"] > 0
    assert rwkv["train_flops_per_image"] == 4 * forward_flops_per_sample(get_model_config("tiny"))
    # 2 image + 2 text blocks, run again in the backward (checkpointing), in the timed and the profiled step
    assert rwkv["bi_wkv_calls"] == {"cuda": 0, "triton": 0, "chunked": 2 * 4 * 2}
    assert vit["bi_wkv_calls"] is None and vit["train_flops_per_image"] > 0
    assert len(rwkv["profile"]) == 3 and all(p["self_ms"] > 0 for p in rwkv["profile"])
    assert "| rwkv-tiny:32:ckpt | 2 |" in capsys.readouterr().out


def test_bench_train_cases_are_checked():
    bench = tool_module("bench_train")
    assert str(bench.Case.parse("rwkv-b16:448:ckpt")) == "rwkv-b16:448:ckpt"
    for bad in ("rwkv-b16", "rwkv-b16:big", "vit-b16:224:fast", "resnet:224"):
        with pytest.raises(SystemExit, match="bench_train"):
            bench.Case.parse(bad)


def test_vit_flops_count_matches_the_formula():
    """ViT-B-16's forward FLOPs by the counting rules of bench_train (known sizes: 196 patches + 1
    class token, width 768, 12 layers, MLP 3072; text 77 tokens, width 512, 12 layers, MLP 2048)."""
    import open_clip

    model = open_clip.create_model("ViT-B-16", pretrained=None)
    def tower(tokens, width, layers, hidden):
        return layers * tokens * (4 * width * width + 2 * width * hidden + 2 * tokens * width)
    macs = 196 * 3 * 16 * 16 * 768 + tower(197, 768, 12, 3072) + 768 * 512 + tower(77, 512, 12, 2048) + 512 * 512
    assert tool_module("bench_train").vit_forward_flops(model) == 2 * macs


def test_gpu_check_script_is_valid_shell():
    assert subprocess.run(["bash", "-n", str(REPO / "tools" / "gpu_check.sh")]).returncode == 0
    if shutil.which("shellcheck"):
        done = subprocess.run(["shellcheck", "-S", "warning", str(REPO / "tools" / "gpu_check.sh")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout


def test_gpu_check_report_gathers_every_figure(tmp_path, capsys):
    (tmp_path / "steps.tsv").write_text("build\t0\t61\nkernel_tests\t1\t200\n")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text(json.dumps(
        {"steps": 105, "resumed_from_step": 100, "final_loss": 1.5, "bi_wkv_calls": {"cuda": 9, "chunked": 0}}))
    (tmp_path / "bench_train.json").write_text(json.dumps({"device": "NVIDIA H100", "precision": "bf16", "results": [
        {"case": "rwkv-b16:224", "batch": 128, "status": "ok", "images_per_s": 1000.0, "peak_memory_gib": 20.0,
         "mfu": 0.41, "profile": [{"name": "bi_wkv", "self_ms": 3.0, "calls": 18}]},
        {"case": "vit-b16:896:ckpt", "batch": 16, "status": "OOM", "images_per_s": None, "peak_memory_gib": None,
         "mfu": None, "profile": []}]}))
    assert tool_module("gpu_check_report").main([str(tmp_path), "gpu", "kernel_tests"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["failed_steps"] == ["kernel_tests"] and results["total_seconds"] == 261
    assert results["bench_wkv_table"] is None  # a file no step wrote is missing, not made up
    text = capsys.readouterr().out
    assert "| kernel_tests | FAILED (1) | 200 |" in text and "| vit-b16:896:ckpt | 16 | OOM | n/a | n/a |" in text
    assert "41.0%" in text and "bi_wkv 3.00" in text


def _wheel(path: Path, name: str, requires: list[str]) -> Path:
    wheel = path / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"{name}-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: " + name + "\n"
                         + "".join(f"Requires-Dist: {r}\n" for r in requires))
    return wheel


def test_wheelhouse_resolution_rules(tmp_path):
    """Roots are the runtime dependencies less torch/torchvision; markers are read for the target
    (Python 3.12 on Linux), extras' dependencies are not followed; the pins are constraints.txt's."""
    wheelhouse = tool_module("make_wheelhouse")
    roots = {r.split(">")[0].split("=")[0] for r in wheelhouse.project_roots()}
    assert {"deepspeed", "mosaicml-streaming", "open_clip_torch"} <= roots and not {"torch", "torchvision"} & roots
    wheel = _wheel(tmp_path, "demo", ["hjson", "tomli; python_version < '3.11'", "pytest; extra == 'test'",
                                      "pywin32; sys_platform == 'win32'"])
    environment = wheelhouse.marker_environment("3.12", "manylinux_x86_64")
    wanted = [r.name for r in wheelhouse.requirements_of(wheel) if not r.marker or r.marker.evaluate(environment)]
    assert wanted == ["hjson"]
    assert wheelhouse.pins()["deepspeed"] and "manylinux_2_17_x86_64" in wheelhouse.platform_tags("manylinux_x86_64")
    assert {"boto3", "google-cloud-storage"} <= set(wheelhouse.SKIPPED)
    assert "transformers" not in wheelhouse.SKIPPED  # streaming.base.dataloader imports it
