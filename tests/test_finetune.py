"""Starting from weights (``model.init_from``), a new resolution, locked towers, layer decay and group
rules, and the loss-spike rewind: one 2-rank ZeRO-2 source run at 32 px (tests/shared_runs.py),
continued by 2-rank ZeRO-3 runs at 48 px with the text tower locked and a deterministic spike (one
uninterrupted, one stopped just after its rewind and resumed), shared by the tests of this module;
unit tests of the same pieces in-process."""
from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, dist_env, loss_log, launch_cmd, run_checked, train_args
from rwkvclip_dist import create_model
from rwkvclip_dist.training.init_from import load_initial_weights
from rwkvclip_dist.training.lock import LockSection, TowerLock, apply_lock
from rwkvclip_dist.training.optim import OptimizerSection, build_optimizer
from rwkvclip_dist.training.param_groups import GroupRule, LayerDecay
from shared_runs import SOURCE_GROUP

# The source run (``source_run``, tests/shared_runs.py) is shared with tests/test_tensor_parallel_finetune.py.
pytestmark = pytest.mark.xdist_group(SOURCE_GROUP)

AT_48 = "model.overrides={text.pool: masked_mean, image.image_size: 48}"
# The continued run, with a deterministic spike: the lr of step 3 x 1000 makes the loss of step 4
# non-finite; checkpoints every 2 steps for the rewind.
FINETUNE = ("parallel.zero_stage=3", AT_48, "model.lock.text.locked=true", "optimizer.layer_decay.image=0.8",
            "optimizer.groups=[{match: logit_scale, lr_scale: 0.5}]", "checkpoint.every_steps=2",
            "checkpoint.keep_last=5", "schedule.kind=constant", "train.spike.enabled=true", "train.spike.window=3",
            "train.spike.inject_lr_scale_at_step=3")
STEPS, STOP = 6, 4  # the split run stops at STOP, just after its rewind, and resumes to STEPS


@pytest.fixture(scope="module")
def finetune(source_run, demo_data, tmp_path_factory):
    """From the trained source: the continued run uninterrupted (``whole``), and the same run stopped
    at step STOP and resumed to STEPS (``run``) with its launches' outputs."""
    root = tmp_path_factory.mktemp("finetune")
    whole, run = root / "whole", root / "run"
    common = (*FINETUNE, f"model.init_from={source_run}")
    run_checked(launch_cmd(2, *train_args(whole, demo_data, *common, f"train.steps={STEPS}")), timeout=600)
    first = run_checked(launch_cmd(2, *train_args(run, demo_data, *common, f"train.steps={STOP}")), timeout=600)
    resumed = run_checked(launch_cmd(2, *train_args(run, demo_data, *common, f"train.steps={STEPS}")), timeout=600)
    return {"run": run, "whole": whole, "log": first.stdout + first.stderr,
            "resumed_log": resumed.stdout + resumed.stderr}


def _weights(checkpoint_dir, tag=None) -> dict[str, torch.Tensor]:
    from rwkvclip_dist.convert.zero import load_zero_checkpoint

    return load_zero_checkpoint(checkpoint_dir, tag)


@pytest.mark.slow
def test_continued_at_a_new_resolution_starts_far_below_a_fresh_model(source_run, finetune):
    """The fresh model's first loss is the source run's first step: the same batch (same seed and data
    order), at 32 px (a fresh 48 px model measured 3.95 on it, the 32 px one 3.97)."""
    continued, fresh = loss_log(finetune["run"])[0]["loss"], loss_log(source_run)[0]["loss"]
    assert continued < fresh - 0.8, (continued, fresh)
    log = finetune["log"]
    assert "model.init_from" in log and "visual.pos_embed: (1, 64, 64) -> (1, 144, 64)" in log
    assert "optimizer groups" in log and "/logit_scale/" in log
    assert "model.lock.text" in log


@pytest.mark.slow
def test_locked_text_tower_is_bitwise_unchanged_and_outside_zero_partitions(source_run, finetune):
    from rwkvclip_dist.checkpoint.safe_load import load_weights_only

    # The last checkpoint: after the spike's 1000 x lr, the rewind and the resume.
    tag = f"step_{STEPS:08d}"
    before, after = _weights(source_run / "checkpoints"), _weights(finetune["run"] / "checkpoints", tag)
    text = [k for k in before if k.startswith("text.")]
    assert text and all(torch.equal(before[k], after[k]) for k in text)
    assert not torch.equal(before["visual.blocks.0.att.key.weight"], after["visual.blocks.0.att.key.weight"])
    # DeepSpeed records the parameters it kept out of its partitions (no fp32 master, no moments).
    states = glob.glob(str(finetune["run"] / "checkpoints" / tag / "*_model_states.pt"))
    frozen = set(load_weights_only(states[0])["frozen_param_shapes"])
    assert {k.removeprefix("module.") for k in frozen} == set(text)


@pytest.mark.slow
def test_a_resumed_run_does_not_reapply_init_from(finetune):
    assert "not applied: the run resumes" in finetune["resumed_log"]
    assert [r["step"] for r in loss_log(finetune["run"])] == [1, 2, 3, 4, 3, 4, 5, 6]  # the rewind at 4


@pytest.mark.slow
def test_text_outputs_unchanged_and_image_grid_interpolated_at_step_0(source_run, tmp_path):
    """The model at 48 px loaded from the run equals the consolidated 32 px model: text embeddings
    bitwise, image embeddings as the 32 px model's run-time interpolation of its position table."""
    from rwkvclip_dist.model.registry import get_model_config
    from rwkvclip_dist.model.clip import RWKVCLIP

    overrides = {"text.pool": "masked_mean"}
    reference = RWKVCLIP(get_model_config("tiny", **overrides), initialize=False).eval()
    state = _weights(source_run / "checkpoints")
    reference.load_state_dict(state)
    model = create_model("tiny", **overrides, **{"image.image_size": 48}).eval()
    report = load_initial_weights(model, source_run)
    assert report.reshaped and not (report.missing or report.unexpected or report.mismatched)
    tokens = torch.randint(0, 1000, (3, model.config.text.context_length))
    images = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), reference.encode_text(tokens))
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6)


def test_refused_source_stops_before_anything_is_written(tmp_path, demo_data):
    from rwkvclip_dist.pretrained import save_pretrained

    source = save_pretrained(create_model("tiny"), tmp_path / "tiny.safetensors")
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, *train_args(run, demo_data, f"model.init_from={source}",
                                                      "model.overrides={text.depth: 3}")],
                          cwd=REPO, env=dist_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "missing text.blocks.2." in proc.stderr and "nothing was loaded" in proc.stderr
    assert "Traceback" not in proc.stderr and not run.exists()


def test_init_ignore_keeps_named_keys_fresh_and_authors_files_load(tmp_path):
    from rwkvclip_dist.convert.authors import to_authors
    from rwkvclip_dist.pretrained import save_pretrained
    from rwkvclip_dist.pretrained_format import StateDictMismatch

    trained = create_model("tiny")
    source = save_pretrained(trained, tmp_path / "tiny.safetensors")
    deeper = create_model("tiny", **{"text.depth": 3})
    fresh_block = deeper.text.blocks[2].att.key.weight.detach().clone()
    with pytest.raises(StateDictMismatch, match="missing text.blocks.2"):
        load_initial_weights(deeper, source)
    assert torch.equal(deeper.text.blocks[2].att.key.weight, fresh_block)  # refused: nothing loaded
    report = load_initial_weights(deeper, source, [r"^text\.blocks\.2\."])
    assert report.missing and all(k.startswith("text.blocks.2.") for k in report.missing)
    assert torch.equal(deeper.text.blocks[0].att.key.weight, trained.text.blocks[0].att.key.weight)
    assert torch.equal(deeper.text.blocks[2].att.key.weight, fresh_block)

    torch.save(to_authors(trained.state_dict(), 2, 2), tmp_path / "authors.pt")
    model = create_model("tiny")
    report = load_initial_weights(model, tmp_path / "authors.pt")
    assert report.kind == "authors' release"
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in model.state_dict().items())


def test_lock_freezes_all_but_the_last_blocks_and_keeps_drop_path_off():
    model = create_model("tiny", **{"image.drop_path_rate": 0.5})
    frozen = apply_lock(model, LockSection(image=TowerLock(locked=True, unlocked_blocks=1, norms_trainable=True)))
    assert "visual.pos_embed" in frozen and "visual.blocks.0.att.key.weight" in frozen
    assert "visual.blocks.0.ln1.weight" not in frozen  # norms stay trainable
    assert not any(k.startswith(("visual.blocks.1.", "visual.ln_out.", "text.")) for k in frozen)
    model.train()
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(0, 1000, (4, model.config.text.context_length))
    out = model(images, tokens)
    assert not model.visual.blocks[0].training and model.visual.blocks[1].training
    (out["image_features"] @ out["text_features"].T).sum().backward()
    params = dict(model.named_parameters())
    assert all(params[k].grad is None for k in frozen)
    assert params["visual.blocks.1.att.key.weight"].grad is not None
    opt = build_optimizer(model, OptimizerSection(), torch.device("cpu"))
    in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(params[k]) in in_optimizer for k in frozen)


def test_layer_decay_and_group_rules():
    model = create_model("tiny")
    section = OptimizerSection(lr=1.0, weight_decay=0.1, layer_decay=LayerDecay(image=0.5),
                               groups=[GroupRule(match=r"^text\.blocks\.1\.", lr_scale=0.1, weight_decay=0.0)])
    opt = build_optimizer(model, section, torch.device("cpu"))
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    # tiny: 2 image blocks, so layers 0 (embeddings) .. 3 (final norm, projection) -> 0.5 ** (3 - layer)
    assert lr_of[id(params["visual.pos_embed"])] == (0.125, 0.0)
    assert lr_of[id(params["visual.patch_embed.weight"])] == (0.125, 0.1)
    assert lr_of[id(params["visual.blocks.0.att.key.weight"])] == (0.25, 0.1)
    assert lr_of[id(params["visual.blocks.1.att.key.weight"])] == (0.5, 0.1)
    assert lr_of[id(params["visual.ln_out.weight"])] == (1.0, 0.0)
    assert lr_of[id(params["text.blocks.0.att.key.weight"])] == (1.0, 0.1)
    assert lr_of[id(params["text.blocks.1.att.key.weight"])] == (pytest.approx(0.1), 0.0)
    assert lr_of[id(params["logit_scale"])] == (1.0, 0.0)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(params)


@pytest.mark.slow
def test_run_records_its_provenance(source_run):
    import subprocess as sp

    launch = json.loads((source_run / "provenance.json").read_text())["launches"][0]
    head = sp.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert launch["git_commit"] == head and isinstance(launch["git_dirty"], bool)
    assert launch["versions"]["torch"] == torch.__version__ and launch["versions"]["deepspeed"]
    assert launch["world"] == {"world_size": 2, "tensor_parallel": 1, "data_parallel": 2, "nodes": 1,
                               "local_world_size": 2}
    assert any(p.startswith("deepspeed==") for p in launch["packages"])


@pytest.mark.slow
def test_export_hub_of_a_run_writes_its_card_and_weights(finetune, tmp_path):
    from tool_loader import tool_main
    from rwkvclip_dist.pretrained_format import load_state_dict_file

    out = tmp_path / "repo"
    assert tool_main("export_hub")([str(finetune["run"]), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert "## Training data" in card and "## Recipe" in card and "image_size: 48" in card
    weights = load_state_dict_file(out / "rwkvclip.safetensors")
    assert torch.equal(weights["text.blocks.0.att.key.weight"],
                       _weights(finetune["run"] / "checkpoints")["text.blocks.0.att.key.weight"])


@pytest.mark.slow
def test_spike_rewinds_skips_the_window_and_ends_finite(finetune):
    import math

    whole = finetune["whole"]
    metrics = json.loads((whole / "metrics.json").read_text())
    assert metrics["steps"] == STEPS and metrics["status"] == "completed"
    [event] = metrics["rewinds"]
    assert (event["step"], event["checkpoint"], event["batches_skipped"]) == (4, "step_00000002", 2)
    assert event["samples_skipped"] == 2 * 32 and event["samples_skipped_from"] == 2 * 32
    records = loss_log(whole)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 3, 4, 5, 6]  # 3 and 4 again, on later batches
    loss = records[3]["loss"]  # loss_log.jsonl is strict JSON: a non-finite loss is null
    assert loss is None or not math.isfinite(loss) or records[3]["skipped"]
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in records[4:])


@pytest.mark.slow
def test_a_run_resumed_after_a_rewind_continues_exactly(finetune):
    whole, split = finetune["whole"], finetune["run"]
    assert {r["step"]: r["loss"] for r in loss_log(split)[-2:]} == {r["step"]: r["loss"] for r in loss_log(whole)[-2:]}
    assert (json.loads((split / "metrics.json").read_text())["rewinds"]
            == json.loads((whole / "metrics.json").read_text())["rewinds"])
