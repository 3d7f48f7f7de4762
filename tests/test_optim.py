"""AdamW parameter groups (what gets weight decay) and the learning-rate schedules."""
from __future__ import annotations

import math

import pytest

import torch

from rwkvclip_dist import create_model
from rwkvclip_dist.training.optim import OptimizerSection, apex_available, build_optimizer, split_decay_groups
from rwkvclip_dist.training.schedule import ScheduleSection, build_schedule
from rwkvclip_dist.typed_config import FieldError

CPU = torch.device("cpu")


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
    opt = build_optimizer(model, OptimizerSection(lr=1e-3, weight_decay=0.2, betas=[0.9, 0.98], eps=1e-6), CPU)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    assert opt.defaults["betas"] == (0.9, 0.98)
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is False  # 'auto' on CPU: the plain loop
    with pytest.raises(FieldError, match="betas"):
        OptimizerSection(betas=[0.9])


def _after_five_fed_steps(model, opt) -> dict[str, torch.Tensor]:
    """The weights after 5 steps of ``opt`` fed seeded gradients of growing size and a changing lr."""
    generator = torch.Generator().manual_seed(1)
    for step in range(5):
        for param in model.parameters():
            param.grad = torch.randn(param.shape, generator=generator) * 10.0 ** (step - 3)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * (step + 1) / 5
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_fused_adamw_makes_the_same_updates_as_the_unfused_one():
    """What a GPU run uses ('auto' picks fused on CUDA) against the CPU path, on CPU: fused AdamW over
    our two parameter groups, fed the same gradients for 5 steps (decoupled decay, bias correction,
    a changing lr), gives the same weights to float rounding. (Gradients are fed, not computed: Adam
    turns last-bit differences of near-zero gradients into whole-lr steps, so a training comparison
    would measure the model's chaos, not the optimizer.)"""
    weights = []
    for impl in ("torch", "fused"):
        torch.manual_seed(0)
        model = create_model("tiny")
        opt = build_optimizer(model, OptimizerSection(lr=1e-2, weight_decay=0.2, impl=impl), CPU)
        assert bool(opt.defaults["fused"]) == (impl == "fused")
        weights.append(_after_five_fed_steps(model, opt))
    torch.manual_seed(0)
    initial = create_model("tiny").state_dict()
    for name, unfused in weights[0].items():
        assert not torch.equal(unfused, initial[name]), f"{name} did not move"
        torch.testing.assert_close(weights[1][name], unfused, rtol=1e-6, atol=1e-7, msg=name)


def test_zero_offload_cpu_adam_makes_the_same_updates_as_torch_adamw():
    """ZeRO-Offload's optimizer (DeepSpeed's CPU Adam, a JIT-built op) over our two parameter groups,
    fed the same gradients as torch's AdamW for 5 steps with a changing lr: the same weights to float
    rounding (it vectorises the same AdamW maths; decoupled decay, bias correction, eps outside sqrt)."""
    weights = []
    for offload in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny")
        opt = build_optimizer(model, OptimizerSection(lr=1e-2, weight_decay=0.2, impl="torch"), CPU, offload=offload)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
        weights.append(_after_five_fed_steps(model, opt))
    assert type(opt).__name__ == "DeepSpeedCPUAdam"
    for name, reference in weights[0].items():
        torch.testing.assert_close(weights[1][name], reference, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(apex_available(), reason="apex is installed here; the error is for machines without it")
def test_asking_for_apex_where_it_is_missing_says_how_to_get_it(tmp_path):
    """The apex path itself (FusedAdam, CUDA only) can be tested only where apex is installed."""
    from rwkvclip_dist.training.recipe import ConfigError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("optimizer: {impl: apex}\n")
    with pytest.raises(ConfigError, match=r"optimizer\.impl: 'apex' asks for apex's FusedAdam, but apex is not "
                                          r"installed here\. apex is not on the package index: build it from source"):
        load_recipe(recipe)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    s = build_schedule(ScheduleSection("cosine", warmup_fraction=0.1, min_lr_ratio=0.1), total_steps=100)
    assert s.warmup_steps == 10
    assert s.factor(0) == pytest.approx(0.1) and s.factor(9) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(55) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.factor(100) == pytest.approx(0.1)
    assert all(s.factor(i) >= s.factor(i + 1) for i in range(10, 100))


def test_onecycle_schedule_endpoints():
    s = build_schedule(ScheduleSection("onecycle", warmup_fraction=0.25, onecycle_div_factor=25,
                                       onecycle_final_div_factor=1e4), total_steps=200)
    assert s.factor(0) == pytest.approx(1 / 25)
    assert s.factor(50) == pytest.approx(1.0)
    assert s.factor(200) == pytest.approx(1 / 25 / 1e4)
    assert max(s.factor(i) for i in range(201)) == pytest.approx(1.0)


def test_schedule_rejects_bad_values():
    with pytest.raises(FieldError, match="warmup_fraction"):
        ScheduleSection(warmup_fraction=1.5)
    with pytest.raises(FieldError, match="min_lr_ratio"):
        ScheduleSection(min_lr_ratio=-0.1)
