"""AdamW parameter groups (what gets weight decay) and the learning-rate schedules."""
from __future__ import annotations

import math

import pytest

from rwkvclip_dist import create_model
from rwkvclip_dist.optim import build_optimizer, split_decay_groups
from rwkvclip_dist.schedule import build_schedule


def test_no_decay_on_norms_biases_mix_vectors_decays_bonus_embeddings_and_logit_scale():
    model = create_model("tiny")
    groups = split_decay_groups(model)
    no_decay = {name for name, _ in groups.no_decay}
    decay = {name for name, _ in groups.decay}
    assert no_decay.isdisjoint(decay)
    assert len(no_decay) + len(decay) == len(list(model.parameters()))
    for name in ("logit_scale", "visual.pos_embed", "text.token_embed.weight",
                 "visual.blocks.0.att.maa_x", "visual.blocks.0.att.maa_g", "visual.blocks.0.att.decay",
                 "visual.blocks.0.att.bonus", "text.blocks.1.att.bonus", "visual.blocks.0.ln1.weight",
                 "visual.blocks.0.ln1.bias", "visual.patch_embed.bias", "text.blocks.0.ffn.maa_k"):
        assert name in no_decay, name
    for name in ("visual.blocks.0.att.maa_w1", "visual.blocks.0.att.maa_w2", "visual.blocks.0.att.decay_w1",
                 "visual.blocks.0.att.decay_w2", "visual.blocks.0.att.key.weight", "visual.patch_embed.weight",
                 "text.blocks.0.ffn.value.weight"):
        assert name in decay, name
    # Every decayed parameter is a genuine matrix or higher.
    assert all(sum(s > 1 for s in p.shape) >= 2 for _, p in groups.decay)


def test_decay_everything_and_optimizer_groups():
    model = create_model("tiny")
    everything = split_decay_groups(model, decay_everything=True)
    assert not everything.no_decay and len(everything.decay) == len(list(model.parameters()))
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.2, betas=[0.9, 0.98], eps=1e-6)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.98)
    with pytest.raises(ValueError, match="betas"):
        build_optimizer(model, 1e-3, 0.2, [0.9], 1e-6)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    s = build_schedule("cosine", total_steps=100, warmup_fraction=0.1, min_lr_ratio=0.1)
    assert s.warmup_steps == 10
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.factor(100) == pytest.approx(0.1)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(10, 100))


def test_onecycle_schedule_endpoints():
    s = build_schedule("onecycle", total_steps=200, warmup_fraction=0.25, div_factor=25, final_div_factor=1e4)
    assert s.factor(0) == pytest.approx(1 / 25)
    assert s.factor(50) == pytest.approx(1.0)
    assert s.factor(200) == pytest.approx(1 / 25 / 1e4)
    assert max(s.factor(i) for i in range(201)) == pytest.approx(1.0)


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError, match="warmup_fraction"):
        build_schedule("cosine", 10, 1.5)
    with pytest.raises(ValueError, match="schedule.kind"):
        build_schedule("linear", 10, 0.1)
