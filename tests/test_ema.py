"""``train.ema`` under ZeRO-2 (with a resume in the middle) and ZeRO-3 on 2 gloo ranks: the EMA that
``tools/convert_checkpoint.py from-zero --ema`` exports equals a single-process EMA of the same run's
consolidated weights, step by step."""
from __future__ import annotations

import pytest
import torch

from conftest import DEMO_RECIPE, run_checked, torchrun_cmd, train_args
from rwkvclip_dist.training.ema import EmaSection, decay_of_update
from tool_loader import tool_main

EMA = ("train.ema.enabled=true", "train.ema.decay=0.6", "train.ema.warmup=true", "checkpoint.every_steps=1",
       "checkpoint.keep_last=10", "optimizer.lr=1e-2")
STEPS = 4


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2_resumed", "zero3"])
def ema_run(request, demo_data, tmp_path_factory):
    stage = request.param
    run = tmp_path_factory.mktemp(f"ema{stage}") / "run"
    common = (*EMA, f"parallel.zero_stage={stage}")
    if stage == 2:  # stopped after step 2 and resumed: the EMA must continue exactly
        run_checked(torchrun_cmd(2, *train_args(run, demo_data, *common, "train.steps=2")), timeout=600)
    run_checked(torchrun_cmd(2, *train_args(run, demo_data, *common, f"train.steps={STEPS}")), timeout=600)
    return run


def _single_process_ema(checkpoints) -> dict[str, torch.Tensor]:
    from rwkvclip_dist.convert.zero import load_zero_checkpoint

    section = EmaSection(enabled=True, decay=0.6, warmup=True)
    ema = None
    for step in range(1, STEPS + 1):
        weights = load_zero_checkpoint(checkpoints, f"step_{step:08d}")
        if ema is None:
            ema = {k: v.clone() for k, v in weights.items()}
            continue
        d = decay_of_update(section, step)
        for key in ema:
            ema[key].mul_(d).add_(weights[key], alpha=1.0 - d)
    return ema


@pytest.mark.slow
def test_exported_ema_equals_a_single_process_ema_of_the_weights(ema_run, tmp_path):
    from rwkvclip_dist.convert.zero import load_zero_checkpoint
    from rwkvclip_dist.pretrained_format import load_state_dict_file

    out = tmp_path / "ema.safetensors"
    assert tool_main("convert_checkpoint")(["from-zero", str(ema_run / "checkpoints"), str(out), "--ema"]) == 0
    exported = load_state_dict_file(out)
    expected = _single_process_ema(ema_run / "checkpoints")
    final = load_zero_checkpoint(ema_run / "checkpoints")
    assert exported.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(exported[key].reshape(expected[key].shape), expected[key], rtol=0, atol=1e-6)
    # Not the weights themselves: the average lags them.
    assert not torch.allclose(exported["visual.blocks.0.att.key.weight"], final["visual.blocks.0.att.key.weight"])


def test_ema_is_refused_without_zero_partitions():
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.typed_config import ConfigError

    with pytest.raises(ConfigError, match="train.ema"):
        load_recipe(DEMO_RECIPE, ["train.ema.enabled=true", "parallel.zero_stage=0"],
                    check_paths=False)
