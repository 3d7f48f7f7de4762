"""Fine-tuning under tensor parallelism, on gloo ranks with real megatron-core layers and DeepSpeed:
``model.init_from`` across TP sizes, ``model.lock`` and ``train.ema`` + ``eval.use_ema`` on TP ranks,
and ``convert_checkpoint.py from-zero --ema`` merging the TP ranks' EMA.

Shared by every test here: a TP=1 source run (2 data-parallel ranks, the one tests/test_finetune.py
continues, tests/shared_runs.py), then two launches of a 2-rank TP=2 ZeRO-2 run started from it with
the text tower locked, an EMA evaluated in the loop, stopped after step 2 and resumed to step 3. The
TP=2 run uses another seed than the source, so its text tower can only equal the source's by having
been loaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import digits_zeroshot, loss_log, launch_cmd, run_checked, train_args
from shared_runs import SOURCE_GROUP
from tool_loader import tool_main

pytestmark = pytest.mark.xdist_group(SOURCE_GROUP)  # with tests/test_finetune.py, which shares the source

OVERRIDES = {"text.pool": "masked_mean"}  # the demo recipe's
EMA_DECAY, STEPS = 0.6, 3
TP2 = ("parallel.tensor_parallel=2", "parallel.zero_stage=2", "train.seed=1", "model.lock.text.locked=true",
       "train.ema.enabled=true", f"train.ema.decay={EMA_DECAY}", "eval.use_ema=true", "optimizer.lr=1e-2",
       "checkpoint.every_steps=1", "checkpoint.keep_last=10")
TP_SIZE = 2


@pytest.fixture(scope="module")
def runs(source_run, demo_data, tmp_path_factory) -> dict[str, Path]:
    source, tp2 = source_run, tmp_path_factory.mktemp("tp_finetune") / "tp2"
    zeroshot = (f"eval.zeroshot=[{{name: digits, data: {demo_data / 'heldout'}, classes: "
                f"{demo_data / 'zeroshot.json'}, every_steps: 2, batch_size: 128, num_workers: 0}}]")
    logs = []
    for steps in (2, STEPS):  # stopped after step 2, resumed: the EMA must continue exactly
        proc = run_checked(launch_cmd(2, *train_args(tp2, demo_data, *TP2, zeroshot, f"train.steps={steps}",
                                                       f"model.init_from={source}")), timeout=400)
        logs.append(proc.stdout + proc.stderr)
    return {"source": source, "tp2": tp2, "log": logs[0]}


def _split_dims() -> dict[str, int]:
    from rwkvclip_dist.model.clip import RWKVCLIP
    from rwkvclip_dist.model.registry import get_model_config
    from rwkvclip_dist.parallel.tensor_parallel import split_dims

    with torch.device("meta"):
        return split_dims(RWKVCLIP(get_model_config("tiny", **OVERRIDES), initialize=False))


def _model_states(run: Path, step: int, tp_rank: int) -> dict:
    from rwkvclip_dist.checkpoint.safe_load import load_weights_only

    return load_weights_only(run / "checkpoints" / f"step_{step:08d}" / f"mp_rank_{tp_rank:02d}_model_states.pt")


def _held(run: Path, step: int, tp_rank: int) -> dict[str, torch.Tensor]:
    """The weights TP rank ``tp_rank`` held at ``step`` (DeepSpeed's model states, plain names)."""
    module = _model_states(run, step, tp_rank)["module"]
    return {k: v for k, v in module.items() if not k.endswith("_extra_state")}


def _slice(full: torch.Tensor, key: str, tp_rank: int, dims: dict[str, int]) -> torch.Tensor:
    return full.chunk(TP_SIZE, dims[key])[tp_rank] if key in dims else full


@pytest.mark.slow
def test_tp1_run_starts_a_tp2_run_whose_locked_tower_stays_bitwise_on_every_tp_rank(runs):
    """init_from TP=1 -> TP=2 (the full weights sliced by the TP plan) and model.lock under TP: after
    3 steps each TP rank's text tower is exactly its slice of the source's, outside ZeRO's partitions."""
    from rwkvclip_dist.convert.zero import load_zero_checkpoint

    source, dims = load_zero_checkpoint(runs["source"] / "checkpoints"), _split_dims()
    assert "model.init_from" in runs["log"] and "model.lock.text: " in runs["log"]
    for tp_rank in range(TP_SIZE):
        held = _held(runs["tp2"], STEPS, tp_rank)
        text = [k for k in held if k.startswith(("text.", "text_proj"))]
        assert any(k in dims for k in text) and any(k not in dims for k in text)  # split and replicated
        for key in text:
            assert torch.equal(held[key], _slice(source[key], key, tp_rank, dims)), (tp_rank, key)
        key = "visual.blocks.0.att.key.weight"  # the unlocked tower trained
        assert not torch.equal(held[key], _slice(source[key], key, tp_rank, dims))
        # Not in the optimizer: DeepSpeed lists the locked tensors as frozen, and the rank's fp32 master
        # partitions hold exactly its trainable parameters (DP=1: one partition holds them all).
        states = _model_states(runs["tp2"], STEPS, tp_rank)
        assert set(states["frozen_param_shapes"]) == set(text)
        trainable = [s for group in states["param_shapes"] for s in group.values()]
        assert not set(n for group in states["param_shapes"] for n in group) & set(text)
        optim = torch.load(runs["tp2"] / "checkpoints" / f"step_{STEPS:08d}" /
                           f"zero_pp_rank_0_mp_rank_{tp_rank:02d}_optim_states.pt", weights_only=False)
        masters = optim["optimizer_state_dict"]["single_partition_of_fp32_groups"]
        assert sum(t.numel() for t in masters) == sum(s.numel() for s in trainable)


@pytest.mark.slow
def test_tp2_run_starts_a_tp1_model(runs):
    """init_from TP=2 -> TP=1: the run's TP shards merged through the TP plan, loaded into the plain
    model the trainer builds before parallelising, equal the weights the TP ranks held."""
    from rwkvclip_dist import create_model
    from rwkvclip_dist.parallel.tensor_parallel import merge_shards
    from rwkvclip_dist.training.init_from import load_initial_weights

    model = create_model("tiny", **OVERRIDES)
    report = load_initial_weights(model, runs["tp2"])
    assert report.kind.endswith(f"step_{STEPS:08d}") and not (report.missing or report.unexpected)
    held = merge_shards([_held(runs["tp2"], STEPS, r) for r in range(TP_SIZE)], _split_dims())
    for key, value in model.state_dict().items():
        assert torch.equal(value, held[key].reshape(value.shape)), key


@pytest.fixture(scope="module")
def exported_ema(runs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp_ema") / "ema.safetensors"
    assert tool_main("convert_checkpoint")(["from-zero", str(runs["tp2"]), str(out), "--ema"]) == 0
    return out


@pytest.mark.slow
def test_tp2_ema_equals_a_single_process_ema_across_a_resume(runs, exported_ema):
    from rwkvclip_dist.convert.zero import load_zero_checkpoint
    from rwkvclip_dist.pretrained_format import load_state_dict_file
    from rwkvclip_dist.training.ema import EmaSection, decay_of_update

    assert json.loads((runs["tp2"] / "metrics.json").read_text())["resumed_from_step"] == 2
    assert [r["step"] for r in loss_log(runs["tp2"])] == [1, 2, 3]
    section, dims, expected = EmaSection(enabled=True, decay=EMA_DECAY), _split_dims(), None
    for step in range(1, STEPS + 1):  # the run's weights, merged from the TP ranks, step by step
        weights = load_zero_checkpoint(runs["tp2"] / "checkpoints", f"step_{step:08d}", dims)
        if expected is None:
            expected = weights
            continue
        d = decay_of_update(section, step)
        expected = {k: d * v + (1 - d) * weights[k] for k, v in expected.items()}
    exported = load_state_dict_file(exported_ema)
    assert exported.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(exported[key].reshape(expected[key].shape), expected[key], rtol=0, atol=1e-6)
    key = "visual.blocks.0.att.key.weight"  # the average lags the weights
    assert not torch.allclose(exported[key], weights[key])


@pytest.mark.slow
def test_use_ema_under_tp2_evaluates_the_exported_ema(runs, exported_ema, demo_data):
    from rwkvclip_dist.pretrained import load_model

    expected = digits_zeroshot(load_model(None, exported_ema), demo_data)
    logged = json.loads((runs["tp2"] / "metrics.json").read_text())["evals"][str(STEPS)]
    assert logged.keys() == expected.keys()
    for key in expected:  # TP's partial sums round differently from one process: one image of 360 at most
        assert logged[key] == pytest.approx(expected[key], abs=1 / 360), key


def test_a_nested_weights_only_load_keeps_the_outer_allow_list(tmp_path):
    """The TP EMA export reads the rank files (``load_weights_only``) inside DeepSpeed's consolidation of
    one TP rank, which reads under the same allow-list: leaving the inner block must not withdraw it
    from the outer one (torch's ``safe_globals`` removes its whole list on exit)."""
    from rwkvclip_dist.checkpoint.safe_load import deepspeed_safe_globals, load_weights_only

    torch.save({"x": torch.ones(1)}, tmp_path / "plain.pt")
    classes = deepspeed_safe_globals()
    assert classes and not any(c in torch.serialization.get_safe_globals() for c in classes)
    with torch.serialization.safe_globals(classes):
        load_weights_only(tmp_path / "plain.pt")
        assert all(c in torch.serialization.get_safe_globals() for c in classes)
    assert not any(c in torch.serialization.get_safe_globals() for c in classes)
