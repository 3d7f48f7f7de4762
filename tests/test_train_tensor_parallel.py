"""Training under tensor parallelism and ZeRO-Offload, end to end with train.py on gloo ranks (real
megatron-core layers, real DeepSpeed): the per-step losses equal the plain runs', resume is exact,
a checkpoint converts to one plain file, and a world or TP size that does not fit is refused.

Every run trains the demo recipe's tiny model for 3 steps with stochastic depth on (image drop-path
0.2), so the curves also show that the ranks of a TP group draw the same masks.
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import DEMO_RECIPE, PYTHON, REPO, dist_env, loss_log, run_checked, launch_cmd, train_args

STEPS = ["train.steps=3", "checkpoint.every_steps=2", "checkpoint.keep_last=3",
         "model.overrides={text.pool: masked_mean, image.drop_path_rate: 0.2}"]
RUNS = {  # name: (ranks, extra overrides); "eval" becomes the held-out zero-shot evaluation at the end
    "plain": (1, ["eval"]), "tp2": (2, ["parallel.tensor_parallel=2", "eval"]),
    "dp2": (2, []),
    # The EMA (one update, at step 2) does not change training; its export is checked below.
    "tp2_dp2": (4, ["parallel.tensor_parallel=2", "train.ema.enabled=true", "train.ema.every_steps=2"]),
    "offload": (1, ["parallel.offload_optimizer=cpu"]),
}
# fp32 on CPU: the TP ranks' partial sums and all-reduces round differently from one process's matmuls.
RTOL = 1e-5

pytestmark = pytest.mark.slow


def _launch(run_dir: Path, data: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    evaluation = (f"eval.zeroshot=[{{name: digits, data: {data / 'heldout'}, classes: {data / 'zeroshot.json'}, "
                  "batch_size: 128, num_workers: 0}]")
    args = train_args(run_dir, data, *STEPS, *(evaluation if e == "eval" else e for e in extra))
    cmd = [PYTHON, *args] if ranks == 1 else launch_cmd(ranks, *args)
    return run_checked(cmd, timeout=400, env=dist_env())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_data):
    """Each run on first use: ``{name: run directory}``."""
    root, done = tmp_path_factory.mktemp("tp_runs"), {}

    def get(name: str) -> Path:
        if name not in done:
            ranks, extra = RUNS[name]
            _launch(root / name, demo_data, ranks, *extra)
            done[name] = root / name
        return done[name]

    return get


def _assert_same_curve(run: Path, reference: Path) -> None:
    got, expected = loss_log(run), loss_log(reference)
    assert [r["step"] for r in got] == [r["step"] for r in expected] == [1, 2, 3]
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=RTOL), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), (a, b)
    assert loss_log(run)[0]["loss"] != loss_log(run)[1]["loss"]  # it trained


def test_tp2_on_two_ranks_equals_one_process(runs, clean_shm):
    _assert_same_curve(runs("tp2"), runs("plain"))


def test_zero_shot_evaluation_under_tp_equals_the_plain_one(runs, clean_shm):
    """The in-loop evaluation shards the held-out images over the data-parallel group: both TP ranks
    encode the same images together, and every image counts once."""
    tp, plain = (json.loads((runs(name) / "metrics.json").read_text()) for name in ("tp2", "plain"))
    assert tp["digits_n"] == plain["digits_n"] == 360
    for key in ("digits_top1", "digits_top5", "digits_mean_per_class"):
        assert tp[key] == pytest.approx(plain[key], abs=1 / 360), key


def test_tp2_times_dp2_on_four_ranks_equals_dp2(runs, clean_shm):
    _assert_same_curve(runs("tp2_dp2"), runs("dp2"))


def test_ema_of_tp_times_dp_is_exported_from_each_ranks_partitions(runs):
    """TP 2 x DP 2: data-parallel rank d of TP rank t keeps its EMA partitions in global rank d * 2 + t's
    file. With one EMA update, at step 2, step 3's checkpoint holds the weights of step 2 as its EMA:
    the export, merged over both TP and DP, must equal them exactly."""
    from rwkvclip_dist.convert.zero import load_zero_checkpoint, trained_model
    from rwkvclip_dist.model.clip import RWKVCLIP
    from rwkvclip_dist.model.registry import get_model_config
    from rwkvclip_dist.parallel.tensor_parallel import split_dims

    checkpoints = runs("tp2_dp2") / "checkpoints"
    name, overrides = trained_model(checkpoints)
    with torch.device("meta"):
        dims = split_dims(RWKVCLIP(get_model_config(name, **overrides), initialize=False))
    ema = load_zero_checkpoint(checkpoints, "step_00000003", dims, ema=True)
    step2, step3 = (load_zero_checkpoint(checkpoints, f"step_0000000{s}", dims) for s in (2, 3))
    assert all(torch.equal(ema[k], step2[k]) for k in step2)
    assert not torch.equal(ema["visual.blocks.0.att.key.weight"], step3["visual.blocks.0.att.key.weight"])


def test_zero_offload_equals_the_optimizer_on_the_device(runs, clean_shm):
    """ZeRO-Offload (DeepSpeed's CPU Adam on the host) against torch's AdamW, same groups and recipe."""
    _assert_same_curve(runs("offload"), runs("plain"))


def _checkpoints_up_to(source: Path, target: Path, step: int) -> None:
    tag = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / tag, target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(tag + "\n")


def test_resume_under_tp_reproduces_the_uninterrupted_curve(runs, demo_data, tmp_path, clean_shm):
    reference = runs("tp2")
    _checkpoints_up_to(reference, tmp_path / "resumed", 2)
    _launch(tmp_path / "resumed", demo_data, 2, "parallel.tensor_parallel=2")
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["resumed_from_step"] == 2
    expected = {r["step"]: r["loss"] for r in loss_log(reference)}
    resumed = loss_log(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3]
    assert resumed[0]["loss"] == expected[3]  # exact: same samples, masks, weights and optimizer state


def test_resuming_with_another_tp_size_is_refused(runs, demo_data, tmp_path, clean_shm):
    _checkpoints_up_to(runs("tp2"), tmp_path / "other", 2)
    proc = subprocess.run([PYTHON, *train_args(tmp_path / "other", demo_data, *STEPS)], cwd=REPO, env=dist_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2  # stopped before any process group or engine started
    assert "was saved with parallel.tensor_parallel=2, this run has 1" in proc.stderr, proc.stderr[-3000:]


def test_tp_checkpoint_converts_to_one_plain_file(runs, tmp_path):
    """from-zero merges the TP ranks' ZeRO shards: the file loads in the plain model, equals the
    weights the TP ranks held (their DeepSpeed model states, merged), and embeds like the model that
    the single-process run trained to the same step."""
    from rwkvclip_dist.convert.pipeline import fixed_batch
    from rwkvclip_dist.parallel.tensor_parallel import merge_shards, split_dims
    from rwkvclip_dist.pretrained import load_model

    out = tmp_path / "tp.safetensors"
    run_checked([PYTHON, str(REPO / "tools" / "convert_checkpoint.py"), "from-zero", str(runs("tp2") / "checkpoints"),
                 str(out)], timeout=120, env=dist_env())
    model = load_model(None, pretrained=out)
    tag_dir = runs("tp2") / "checkpoints" / "step_00000003"
    modules = [torch.load(tag_dir / f"mp_rank_{r:02d}_model_states.pt", weights_only=False)["module"] for r in range(2)]
    held = merge_shards([{k: v for k, v in m.items() if not k.endswith("_extra_state")} for m in modules],
                        split_dims(model))
    held["logit_scale"] = held["logit_scale"].reshape(())
    assert all(torch.equal(v, held[k]) for k, v in model.state_dict().items())

    plain_out = tmp_path / "plain.safetensors"
    run_checked([PYTHON, str(REPO / "tools" / "convert_checkpoint.py"), "from-zero",
                 str(runs("plain") / "checkpoints"), str(plain_out)], timeout=120, env=dist_env())
    plain = load_model(None, pretrained=plain_out)
    images, tokens = fixed_batch(model.config)
    with torch.no_grad():
        for ours, theirs in ((model.encode_image(images), plain.encode_image(images)),
                             (model.encode_text(tokens), plain.encode_text(tokens))):
            assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-3


def test_a_world_that_tp_does_not_divide_is_refused_before_training(demo_data, tmp_path):
    proc = subprocess.run([PYTHON, *train_args(tmp_path / "run", demo_data, "parallel.tensor_parallel=2")],
                          cwd=REPO, env=dist_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "parallel.tensor_parallel=2 does not divide the world size 1" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("override, message", [
    ("parallel.tensor_parallel=3", "parallel.tensor_parallel: model 'tiny': image tower has 4 heads"),
    ("parallel.offload_optimizer=cpu", "parallel.offload_optimizer: ZeRO-Offload needs zero_stage >= 1"),
])
def test_parallel_settings_that_cannot_work_stop_at_load(override, message):
    from rwkvclip_dist.training.recipe import ConfigError, load_recipe

    overrides = [override] + (["parallel.zero_stage=0"] if "offload" in override else [])
    with pytest.raises(ConfigError, match=message):
        load_recipe(DEMO_RECIPE, overrides)
