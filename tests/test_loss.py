"""Contrastive losses: 2 gloo ranks give the loss and every gradient of one process holding the
concatenated batch (after the data-parallel mean that DeepSpeed applies to gradients)."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from rwkvclip_dist.loss import ClipLoss, LossSection, SigLipLoss, build_loss

CASES = [("clip", True), ("clip", False), ("siglip", True), ("siglip", False)]


def _towers(seed: int = 0):
    torch.manual_seed(seed)
    image = torch.nn.Linear(6, 5).double()
    text = torch.nn.Linear(7, 5).double()
    scale = torch.nn.Parameter(torch.tensor([2.0], dtype=torch.float64))
    return image, text, scale


def _inputs(batch: int):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(batch, 6, generator=gen, dtype=torch.float64), torch.randn(batch, 7, generator=gen, dtype=torch.float64)


def _loss_and_grads(loss_fn, image, text, scale, x_img, x_txt):
    for p in [*image.parameters(), *text.parameters(), scale]:
        p.grad = None
    loss = loss_fn(F.normalize(image(x_img), dim=-1), F.normalize(text(x_txt), dim=-1), scale.exp())
    loss.backward()
    grads = [p.grad.clone() for p in [*image.parameters(), *text.parameters(), scale]]
    return loss.detach(), grads


def test_clip_loss_single_process_matches_the_definition():
    image, text, scale = _towers()
    x_img, x_txt = _inputs(5)
    img, txt = F.normalize(image(x_img), dim=-1), F.normalize(text(x_txt), dim=-1)
    logits = scale.exp() * img @ txt.T
    expected = 0.0
    for i in range(5):
        expected -= 0.5 * (torch.log_softmax(logits[i], 0)[i] + torch.log_softmax(logits[:, i], 0)[i])
    got = ClipLoss(rank=0, world_size=1)(img, txt, scale.exp())
    assert torch.allclose(got, expected / 5, rtol=1e-12)


def test_siglip_loss_single_process_matches_the_definition():
    image, text, scale = _towers()
    x_img, x_txt = _inputs(4)
    img, txt = F.normalize(image(x_img), dim=-1), F.normalize(text(x_txt), dim=-1)
    logits = scale.exp() * img @ txt.T - 10.0
    signs = 2 * torch.eye(4, dtype=torch.float64) - 1
    expected = -sum(math.log(torch.sigmoid(signs[i, j] * logits[i, j]).item()) for i in range(4) for j in range(4)) / 4
    got = SigLipLoss(bias=-10.0, rank=0, world_size=1)(img, txt, scale.exp())
    assert got.item() == pytest.approx(expected, rel=1e-10)


def test_loss_kind_is_checked_when_the_recipe_loads(tmp_path):
    from rwkvclip_dist.training.recipe import ConfigError, load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text("loss: {kind: triplet}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: loss\.kind: expected one of 'clip', 'siglip'"):
        load_recipe(recipe)
    assert isinstance(build_loss(LossSection(kind="siglip", siglip_bias=-5.0)), SigLipLoss)


def _with_stand_in(x_img, x_txt, source: int, copy: int):
    """The batch as the data loader builds it around an undecodable sample: a copy of a neighbour."""
    x_img, x_txt = x_img.clone(), x_txt.clone()
    x_img[copy], x_txt[copy] = x_img[source], x_txt[source]
    valid = torch.ones(x_img.shape[0], dtype=torch.bool)
    valid[copy] = False
    return x_img, x_txt, valid


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_masked_stand_in_gives_the_loss_of_the_batch_without_it(kind):
    image, text, scale = _towers()
    x_img, x_txt, valid = _with_stand_in(*_inputs(6), source=2, copy=3)
    loss_fn = build_loss(LossSection(kind))
    ref_loss, ref_grads = _loss_and_grads(loss_fn, image, text, scale, x_img[valid], x_txt[valid])
    loss, grads = _loss_and_grads(lambda *a: loss_fn(*a, valid=valid), image, text, scale, x_img, x_txt)
    assert abs(loss.item() - ref_loss.item()) < 1e-12
    assert max((g - r).abs().max().item() for g, r in zip(grads, ref_grads)) < 1e-12
    # Control: unmasked, the copy is a false negative of its original and changes the loss.
    assert abs(loss_fn(*_features(image, text, x_img, x_txt), scale.exp()).item() - ref_loss.item()) > 1e-3
    # All valid: the unmasked computation, bit for bit.
    all_valid = torch.ones(6, dtype=torch.bool)
    features = _features(image, text, x_img, x_txt)
    assert torch.equal(loss_fn(*features, scale.exp(), valid=all_valid), loss_fn(*features, scale.exp()))


def _features(image, text, x_img, x_txt):
    return F.normalize(image(x_img), dim=-1), F.normalize(text(x_txt), dim=-1)


def worker(out_path: str) -> None:
    """Runs on each of 2 gloo ranks (torchrun): compare against the 1-process loss and gradients."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    per_rank = 4
    x_img, x_txt = _inputs(per_rank * world)
    rows = slice(rank * per_rank, (rank + 1) * per_rank)
    report = {}
    for kind, local in CASES:
        for gather_with_grad in (True, False):
            image, text, scale = _towers()
            reference = build_loss(LossSection(kind, local_loss=local, gather_with_grad=True))
            reference.rank, reference.world_size = 0, 1  # one process holding the whole batch
            ref_loss, ref_grads = _loss_and_grads(reference, image, text, scale, x_img, x_txt)
            dist_fn = build_loss(LossSection(kind, local_loss=local, gather_with_grad=gather_with_grad))
            loss, grads = _loss_and_grads(dist_fn, image, text, scale, x_img[rows], x_txt[rows])
            dist.all_reduce(loss)
            for g in grads:
                dist.all_reduce(g)
            loss_err = abs(loss.item() / world - ref_loss.item())
            grad_err = max((g / world - r).abs().max().item() for g, r in zip(grads, ref_grads))
            report[f"{kind}-local{int(local)}-gwg{int(gather_with_grad)}"] = [loss_err, grad_err]
        # A stand-in on rank 1 (a copy of its neighbour on rank 0's side of the batch) is masked: the
        # ranks' mean equals one process over the global batch without it.
        s_img, s_txt, valid = _with_stand_in(x_img, x_txt, source=per_rank - 1, copy=per_rank + 1)
        image, text, scale = _towers()
        reference = build_loss(LossSection(kind, local_loss=local))
        reference.rank, reference.world_size = 0, 1
        ref_loss, ref_grads = _loss_and_grads(reference, image, text, scale, s_img[valid], s_txt[valid])
        masked_fn = build_loss(LossSection(kind, local_loss=local))
        loss, grads = _loss_and_grads(lambda *a: masked_fn(*a, valid=valid[rows]), image, text, scale,
                                      s_img[rows], s_txt[rows])
        dist.all_reduce(loss)
        for g in grads:
            dist.all_reduce(g)
        report[f"{kind}-local{int(local)}-masked"] = [
            abs(loss.item() / world - ref_loss.item()),
            max((g / world - r).abs().max().item() for g, r in zip(grads, ref_grads))]
    if rank == 0:
        with open(out_path, "w") as handle:
            json.dump(report, handle)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_equal_one_process_over_the_concatenated_batch(tmp_path, clean_shm):
    from conftest import dist_env, run_checked, launch_cmd

    out = tmp_path / "report.json"
    run_checked(launch_cmd(2, __file__, str(out)), timeout=180, env=dist_env())
    report = json.loads(out.read_text())
    for kind, local in CASES:
        loss_err, grad_err = report[f"{kind}-local{int(local)}-gwg1"]
        assert loss_err < 1e-12 and grad_err < 1e-12, (kind, local, loss_err, grad_err)
        # Control: without the gradient through the gather, the other ranks' terms are missing.
        _, grad_err_no_gather = report[f"{kind}-local{int(local)}-gwg0"]
        assert grad_err_no_gather > 1e-4, (kind, local, grad_err_no_gather)
        loss_err, grad_err = report[f"{kind}-local{int(local)}-masked"]
        assert loss_err < 1e-12 and grad_err < 1e-12, ("masked", kind, local, loss_err, grad_err)


if __name__ == "__main__":
    worker(sys.argv[1])
