"""``train.ema`` under ZeRO-2 (with a resume in the middle) and ZeRO-3 on 2 gloo ranks: the EMA that
``tools/convert_checkpoint.py from-zero --ema`` exports equals a single-process EMA of the same run's
consolidated weights, step by step. The runs are shared with other files' tests (tests/shared_runs.py):
the ZeRO-2 one also logs to wandb and evaluates its EMA in the loop, the ZeRO-3 one is the SigLIP run."""
from __future__ import annotations

import pytest
import torch

from conftest import DEMO_RECIPE
from rwkvclip_dist.training.ema import EmaSection, decay_of_update
from shared_runs import SIGLIP_GROUP, SIGLIP_STEPS, ZERO2_GROUP, ZERO2_STEPS
from tool_loader import tool_main


@pytest.fixture(scope="module", ids=["zero2_resumed", "zero3"], params=[
    pytest.param(("ema_zero2_run", ZERO2_STEPS), marks=pytest.mark.xdist_group(ZERO2_GROUP)),
    pytest.param(("siglip_ema_run", SIGLIP_STEPS), marks=pytest.mark.xdist_group(SIGLIP_GROUP))])
def ema_run(request):
    """(run directory, its number of steps)."""
    fixture, steps = request.param
    return request.getfixturevalue(fixture), steps


def _single_process_ema(checkpoints, steps: int) -> dict[str, torch.Tensor]:
    from rwkvclip_dist.convert.zero import load_zero_checkpoint

    section = EmaSection(enabled=True, decay=0.6, warmup=True)
    ema = None
    for step in range(1, steps + 1):
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

    run, steps = ema_run
    out = tmp_path / "ema.safetensors"
    assert tool_main("convert_checkpoint")(["from-zero", str(run / "checkpoints"), str(out), "--ema"]) == 0
    exported = load_state_dict_file(out)
    expected = _single_process_ema(run / "checkpoints", steps)
    final = load_zero_checkpoint(run / "checkpoints")
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
