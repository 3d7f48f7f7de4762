"""The learned SigLIP bias (trained under ZeRO-3 on 2 gloo ranks with accumulation, converted, loaded
for inference), the warmup-stable-decay schedule, and tools/average_checkpoints.py (model soups) on
the files that run's checkpoints convert to. The run also keeps an EMA, for the ZeRO-3 case of
tests/test_ema.py (tests/shared_runs.py): the bias and the files checked here are the trained weights."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import loss_log
from rwkvclip_dist import create_model
from rwkvclip_dist.loss import SigLipLoss
from rwkvclip_dist.training.accumulation import contrastive_step, split_micro_batches
from rwkvclip_dist.training.schedule import ScheduleSection, build_schedule
from shared_runs import SIGLIP_GROUP
from tool_loader import tool_main


@pytest.fixture(scope="module")
def siglip_run(siglip_ema_run, tmp_path_factory):
    """The shared SigLIP run (tests/shared_runs.py); its checkpoints of steps 2 and 3 as pretrained files."""
    root = tmp_path_factory.mktemp("siglip_files")
    convert = tool_main("convert_checkpoint")
    files = {}
    for step in (2, 3):
        files[step] = root / f"step{step}.safetensors"
        assert convert(["from-zero", str(siglip_ema_run / "checkpoints"), str(files[step]), "--tag",
                        f"step_{step:08d}", "--verify"]) == 0
    return {"run": siglip_ema_run, "files": files}


@pytest.mark.slow
@pytest.mark.xdist_group(SIGLIP_GROUP)
def test_learned_bias_trains_and_survives_conversion_and_loading(siglip_run):
    from rwkvclip_dist.convert.zero import load_zero_checkpoint
    from rwkvclip_dist.pretrained import load_model

    consolidated = load_zero_checkpoint(siglip_run["run"] / "checkpoints")
    model = load_model(None, pretrained=siglip_run["files"][3])
    assert model.logit_bias is not None and model.config.init_logit_bias == -10.0
    assert float(model.logit_bias.detach()) != -10.0  # it learned
    assert torch.equal(model.logit_bias.detach(), consolidated["logit_bias"])
    # wsd from step 1 over 3 steps: peak, then down to min_lr_ratio (0) at the last step.
    assert [round(r["lr"], 8) for r in loss_log(siglip_run["run"])] == [0.01, 0.005, 0.0]
    assert all(math.isfinite(r["loss"]) for r in loss_log(siglip_run["run"]))


@pytest.mark.slow
@pytest.mark.xdist_group(SIGLIP_GROUP)
def test_average_checkpoints_is_the_weighted_mean_and_refuses_other_architectures(siglip_run, tmp_path, capsys):
    from rwkvclip_dist.pretrained import save_pretrained
    from rwkvclip_dist.pretrained_format import load_state_dict_file

    average = tool_main("average_checkpoints")
    a, b = siglip_run["files"][2], siglip_run["files"][3]
    out = tmp_path / "soup.safetensors"
    assert average([str(a), str(b), "--weights", "3", "1", "--out", str(out)]) == 0
    sa, sb, soup = load_state_dict_file(a), load_state_dict_file(b), load_state_dict_file(out)
    for key in sa:
        expected = (0.75 * sa[key].double() + 0.25 * sb[key].double()).float()
        assert torch.equal(soup[key], expected), key
    other = save_pretrained(create_model("tiny", **{"text.pool": "masked_mean", "text.depth": 3,
                                                     "init_logit_bias": -10.0}), tmp_path / "deeper.safetensors")
    capsys.readouterr()
    assert average([str(a), str(other), "--out", str(tmp_path / "bad.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "architecture differs" in err and "text.depth" in err
    assert not (tmp_path / "bad.safetensors").exists()
    assert average([str(a), str(b), "--out", str(a)]) == 2  # never over an input


def test_learned_bias_gradient_under_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = create_model("tiny", init_logit_bias=-10.0)
    loss_fn = SigLipLoss(rank=0, world_size=1)
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = torch.randint(1, 49000, (4, 77), generator=torch.Generator().manual_seed(2))
    contrastive_step(model, loss_fn, lambda loss: loss.backward(), split_micro_batches(images, tokens, 1))
    expected = model.logit_bias.grad.clone()
    assert expected.abs() > 0
    model.zero_grad()
    contrastive_step(model, loss_fn, lambda loss: loss.backward(), split_micro_batches(images, tokens, 2))
    torch.testing.assert_close(model.logit_bias.grad, expected, rtol=1e-5, atol=1e-7)


def test_wsd_schedule_shapes_and_cooldown_from():
    linear = build_schedule(ScheduleSection("wsd", warmup_fraction=0.1, cooldown_fraction=0.2, min_lr_ratio=0.1), 100)
    assert linear.factor(0) == pytest.approx(0.1) and linear.factor(9) == 1.0
    assert linear.factor(10) == linear.factor(79) == 1.0
    assert linear.factor(80) == pytest.approx(1 - 0.9 * 1 / 20) and linear.factor(99) == pytest.approx(0.1)
    sqrt = build_schedule(ScheduleSection("wsd", warmup_fraction=0.1, cooldown_shape="sqrt"), 100)
    assert sqrt.factor(89) == pytest.approx(1 - math.sqrt(0.5))
    cosine = build_schedule(ScheduleSection("wsd", warmup_fraction=0.0, cooldown_shape="cosine"), 100)
    assert cosine.factor(89) == pytest.approx(0.5) and cosine.factor(99) == pytest.approx(0.0)
    # A stable run's lr does not depend on where its cool-down will start: a cool-down from step 50
    # of a 1000-step stable run gives the stable lr up to 50, then falls to 0 at step 59.
    stable = build_schedule(ScheduleSection("wsd", warmup_fraction=0.01, cooldown_fraction=0.0), 1000)
    cooled = build_schedule(ScheduleSection("wsd", warmup_fraction=0.01 * 1000 / 60, cooldown_from=50), 60)
    assert [cooled.factor(s) for s in range(50)] == [stable.factor(s) for s in range(50)]
    assert cooled.factor(50) < 1.0 and cooled.factor(59) == 0.0
