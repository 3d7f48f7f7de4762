"""The GPU-run tools on CPU: tools/bench_train.py at tiny size, tools/gpu_check.sh's shell and its
report, tools/make_wheelhouse.py's resolution rules (without the network: a wheel made here).

The full `tools/gpu_check.sh --cpu` run (every step, a training run included) takes minutes and
is run by hand (docs/cuda.md); these keep its pieces from breaking in CI.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
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


GPU_ORDER = ["env", "build", "kernel_focus", "bench_wkv", "demo_data", "train", "train_resume", "train_checks",
             "bench_train", "kernel_rest", "sanitizer_memcheck", "sanitizer_racecheck", "sanitizer_synccheck",
             "sanitizer_initcheck"]


def test_gpu_check_steps_by_value_within_seven_minutes():
    """The GPU plan: environment, build, the focused kernel tests, the Bi-WKV benchmark, the
    DeepSpeed run and resume, the training-step benchmark, then the rest; estimates sum to at most
    7 minutes with the wheelhouse, and each limit leaves room over its estimate."""
    plan = tool_module("gpu_check_plan")
    gpu = plan.steps_for("gpu", wheelhouse=True)
    assert [s.name for s in gpu] == ["wheelhouse", *GPU_ORDER]
    assert sum(s.estimate_s for s in gpu) <= plan.TOTAL_ESTIMATE_S == 420
    assert all(s.limit_s >= 2 * s.estimate_s for s in gpu)
    cpu = [s.name for s in plan.steps_for("cpu", wheelhouse=False)]
    assert "demo_data" in cpu and "baseline_build" in cpu and not any(n.startswith("sanitizer_m") for n in cpu)


def test_gpu_check_header_states_the_plan():
    """The script's header lists every GPU step with the planner's estimate and limit, and the total."""
    plan = tool_module("gpu_check_plan")
    header = (REPO / "tools" / "gpu_check.sh").read_text().split("\nset -uo")[0]
    rows = {m[0]: (int(m[1]), int(m[2])) for m in re.findall(r"^#   (\w+) +(\d+) +(\d+)", header, re.M)}
    assert rows == {s.name: (s.estimate_s, s.limit_s) for s in plan.steps_for("gpu", wheelhouse=True)}
    total = int(re.search(r"^#   total +(\d+)", header, re.M).group(1))
    assert total == sum(s.estimate_s for s in plan.steps_for("gpu", wheelhouse=True))


def test_only_left_picks_up_exactly_what_was_left(tmp_path):
    """After a call that passed some steps, failed one and ran out of budget for others, `--only
    left` takes those, plus env and the build a fresh machine needs, and the training run a resume
    continues only when its run directory is gone; names and prefixes select too."""
    plan = tool_module("gpu_check_plan")
    with pytest.raises(plan.PlanError, match="no state file"):
        plan.select("gpu", "left", tmp_path, wheelhouse=False)
    plan.plan("gpu", None, tmp_path, wheelhouse=False)
    for name in GPU_ORDER:
        code = {"bench_wkv": 1, "train_resume": 124}.get(name, 125 if GPU_ORDER.index(name) > 8 else 0)
        plan.record(tmp_path, name, code, 3)
    assert plan.left(tmp_path) == ["bench_wkv", "train_resume", "kernel_rest", *GPU_ORDER[-4:]]
    names = [s.name for s in plan.select("gpu", "left", tmp_path, wheelhouse=False)]
    assert names == ["env", "build", "bench_wkv", "demo_data", "train", "train_resume", "kernel_rest", *GPU_ORDER[-4:]]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text("{}")  # the same machine: the first run is still there
    names = [s.name for s in plan.select("gpu", "left", tmp_path, wheelhouse=True)]
    assert "train" not in names and names[:2] == ["wheelhouse", "env"]
    assert [s.name for s in plan.select("gpu", "sanitizer,bench_wkv", tmp_path, False)] == \
        ["env", "build", "bench_wkv", *GPU_ORDER[-4:]]
    with pytest.raises(plan.PlanError, match="--only sanitizer_cpu: no such step in gpu mode"):
        plan.select("gpu", "sanitizer_cpu", tmp_path, False)
    # a second call keeps the first call's passes in the state file
    plan.plan("gpu", "bench_wkv", tmp_path, wheelhouse=False)
    plan.record(tmp_path, "bench_wkv", 0, 5)
    assert plan.read_state(tmp_path)["kernel_focus"] == "ok" and "bench_wkv" not in plan.left(tmp_path)


def _dry_run(out, *args, fail=""):
    env = {**os.environ, "GPU_CHECK_FAIL": fail, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(REPO / "tools" / "gpu_check.sh"), "--dry-run", *args, str(out)],
                          capture_output=True, text=True, env=env, timeout=120)


def test_gpu_check_budget_and_second_call_in_the_shell(tmp_path):
    """The script itself (--dry-run: plans, records and reports without running the steps): a step
    whose estimate exceeds what is left of the budget is not run while later, shorter ones are; a
    failed step is reported; `--only left` then runs exactly what was left, and a third call finds
    nothing to do."""
    first = _dry_run(tmp_path, "--budget", "60", fail="kernel_focus")
    assert first.returncode == 1, first.stderr
    state = tool_module("gpu_check_plan").read_state(tmp_path)
    assert state["build"] == state["bench_train"] == "not_run"  # 70 s and 80 s do not fit in 60
    assert state["kernel_focus"] == "failed:1" and state["train"] == state["sanitizer_initcheck"] == "ok"
    assert "| build | not run |" in first.stdout and "| kernel_focus | FAILED (1) |" in first.stdout
    second = _dry_run(tmp_path, "--only", "left")
    assert second.returncode == 0, second.stderr
    ran = [line.split("\t")[0] for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert ran == ["env", "build", "kernel_focus", "bench_train"]
    third = _dry_run(tmp_path, "--only", "left")
    assert third.returncode == 0 and "nothing left to run" in third.stdout


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
