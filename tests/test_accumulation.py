"""Contrastive gradient accumulation: K micro-batches give the gradient of one K-times larger batch,
in one process and through DeepSpeed ZeRO-2 on 2 gloo ranks (which must neither divide by K nor
step before the last micro-batch)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from rwkvclip_dist import create_model
from rwkvclip_dist.loss import ClipLoss
from rwkvclip_dist.training.accumulation import contrastive_step, split_micro_batches


def _batch(n: int, seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=gen)
    tokens = torch.zeros(n, 77, dtype=torch.long)
    for i in range(n):
        length = 3 + i % 5
        tokens[i, 0] = 49406
        tokens[i, 1:length] = torch.randint(1, 49000, (length - 1,), generator=gen)
        tokens[i, length] = 49407
    return images, tokens


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and "logit_scale" in got
    for name in expected:
        err = (got[name] - expected[name]).abs().max().item()
        assert err <= 1e-4 * expected[name].abs().max().item() + 1e-9, (name, err)


def _tiny(drop_path: float):
    torch.manual_seed(0)
    return create_model("tiny", **{"image.drop_path_rate": drop_path})


def _loss(model, loss_fn, images, tokens):
    out = model(images, tokens)
    return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])


@pytest.mark.parametrize("parts", [2, 4])
def test_accumulated_gradient_equals_one_big_batch(parts):
    images, tokens = _batch(8)
    loss_fn = ClipLoss(rank=0, world_size=1)
    model = _tiny(0.0)
    big_loss = _loss(model, loss_fn, images, tokens)
    big_loss.backward()
    expected = _grads(model)
    model.zero_grad()
    out = contrastive_step(model, loss_fn, lambda loss: loss.backward(), split_micro_batches(images, tokens, parts))
    got = _grads(model)
    assert out.finite and out.loss == pytest.approx(big_loss.item(), rel=1e-5)
    assert_grads_close(got, expected)


def test_accumulation_leaves_a_stand_in_out_of_every_micro_batch_loss():
    """A stand-in for an undecodable sample (a copy of sample 2) in the second of two micro-batches:
    the accumulated gradient equals one batch without it."""
    images, tokens = _batch(8)
    images[5], tokens[5] = images[2], tokens[2]
    valid = torch.ones(8, dtype=torch.bool)
    valid[5] = False
    loss_fn = ClipLoss(rank=0, world_size=1)
    model = _tiny(0.0)
    reference = _loss(model, loss_fn, images[valid], tokens[valid])
    reference.backward()
    expected = _grads(model)
    model.zero_grad()
    out = contrastive_step(model, loss_fn, lambda loss: loss.backward(), split_micro_batches(images, tokens, 2), valid)
    assert out.loss == pytest.approx(reference.item(), rel=1e-5)
    assert_grads_close(_grads(model), expected)


def test_stochastic_depth_masks_are_replayed_in_the_gradient_pass():
    """With drop-path active, the reference is one loss over the micro-batches' features drawn from
    the same RNG stream; re-embedding with fresh masks would give a different gradient."""
    images, tokens = _batch(8)
    loss_fn = ClipLoss(rank=0, world_size=1)
    micro = split_micro_batches(images, tokens, 2)
    model = _tiny(0.5)
    torch.manual_seed(11)
    outs = [model(i, t) for i, t in micro]
    loss = loss_fn(torch.cat([o["image_features"] for o in outs]), torch.cat([o["text_features"] for o in outs]),
                   outs[0]["logit_scale"])
    loss.backward()
    expected = _grads(model)
    model.zero_grad()
    torch.manual_seed(11)
    contrastive_step(model, loss_fn, lambda l: l.backward(), micro)
    assert_grads_close(_grads(model), expected)


def test_nonfinite_loss_skips_the_backward():
    images, tokens = _batch(4)
    model = _tiny(0.0)
    with torch.no_grad():
        model.logit_scale.fill_(float("nan"))
    calls = []
    out = contrastive_step(model, ClipLoss(rank=0, world_size=1), calls.append, split_micro_batches(images, tokens, 2))
    assert not out.finite and calls == []


def worker(out_path: str) -> None:
    """On 2 gloo ranks: one ZeRO-2 step with K=2 micro-batches per rank and plain SGD (lr 1, so the
    parameter change is minus the gradient) against autograd over the global batch in one process."""
    import torch.distributed as dist

    from rwkvclip_dist.parallel.engine import ParallelSection, create_engine, deepspeed_config, init_distributed
    from rwkvclip_dist.parallel.launch_env import detect_launch_env

    launch = detect_launch_env()
    init_distributed(launch, "gloo")
    rank, world, per_rank, parts = launch.rank, launch.world_size, 4, 2
    images, tokens = _batch(per_rank * world)
    reference = _tiny(0.0)
    _loss(reference, ClipLoss(rank=0, world_size=1), images, tokens).backward()
    expected = _grads(reference)

    model = _tiny(0.0)
    before = {n: p.detach().clone().reshape(p.shape) for n, p in model.named_parameters()}
    engine = create_engine(model, torch.optim.SGD(model.parameters(), lr=1.0), deepspeed_config(
        ParallelSection(zero_stage=2, precision="fp32"), micro_batch=per_rank // parts, accumulation_steps=parts,
        world_size=world, grad_clip=0.0))
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    steps_seen = []

    def backward(loss):
        engine.backward(loss, scale_wrt_gas=False)
        engine.step()
        steps_seen.append(engine.global_steps)

    contrastive_step(engine, ClipLoss(), backward, split_micro_batches(images[rows], tokens[rows], parts))
    errors = {}
    for name, param in engine.module.named_parameters():
        delta = before[name] - param.detach().reshape(before[name].shape)
        # The parameter change is only known to float32 resolution of the parameter itself.
        resolution = 4 * torch.finfo(torch.float32).eps * before[name].abs().max().item()
        tolerance = 1e-4 * expected[name].abs().max().item() + resolution + 1e-9
        errors[name] = (delta - expected[name].reshape(delta.shape)).abs().max().item() / tolerance
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump({"errors": errors, "steps_seen": steps_seen}, handle)
    dist.barrier()


@pytest.mark.slow
def test_deepspeed_zero2_accumulation_equals_one_big_batch(tmp_path, clean_shm):
    from conftest import dist_env, run_checked, launch_cmd

    out = tmp_path / "report.json"
    run_checked(launch_cmd(2, __file__, str(out)), timeout=240, env=dist_env())
    report = json.loads(out.read_text())
    assert report["steps_seen"] == [0, 1], "DeepSpeed stepped before the last micro-batch (or never)"
    worst = max(report["errors"].items(), key=lambda kv: kv[1])
    assert len(report["errors"]) > 20 and worst[1] < 1.0, worst  # errors are in units of the tolerance


if __name__ == "__main__":
    worker(sys.argv[1])
