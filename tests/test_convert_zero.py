"""Real DeepSpeed ZeRO-2 and ZeRO-3 checkpoints from 2 gloo ranks (CPU accelerator, torch AdamW)
are consolidated into one safetensors file whose weights equal the engine's, in fp32 and bf16.
Under ZeRO-3 each rank holds only a shard of every parameter; the expected weights are gathered
from the live engine before it saves."""

from __future__ import annotations

import os
import re

import pytest
import torch
import torch.multiprocessing as mp

from rwkvclip_dist.pretrained_format import load_state_dict_file, read_record
from rwkvclip_dist.convert.pipeline import verify_state, zero_to_ours
from rwkvclip_dist import create_model
from rwkvclip_dist.parallel.launch_env import free_port

pytestmark = pytest.mark.timeout(180)


def _train_one_step(rank: int, world: int, out: str, port: int, stage: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    import deepspeed

    from rwkvclip_dist.parallel.engine import ParallelSection, create_engine, deepspeed_config

    torch.manual_seed(0)
    model = create_model("tiny")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    config = deepspeed_config(ParallelSection(zero_stage=stage, precision="fp32"), micro_batch=2,
                              accumulation_steps=1, world_size=world, grad_clip=1.0)
    # The trainer's own engine setup (it trains the 0-dim logit_scale as shape [1], as DeepSpeed needs).
    engine = create_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-2), config)
    generator = torch.Generator().manual_seed(rank)
    out_ = engine(torch.randn(2, 3, 32, 32, generator=generator), torch.randint(0, 49408, (2, 77), generator=generator))
    engine.backward((out_["image_features"] * out_["text_features"]).sum())
    engine.step()
    engine.save_checkpoint(out)
    # a no-op below stage 3; under it, every rank takes part in gathering the full parameters
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
        expected = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        expected["logit_scale"] = expected["logit_scale"].reshape(())
        torch.save(expected, os.path.join(out, "expected.pt"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_two_ranks_consolidates_exactly(tmp_path, stage):
    os.environ["DS_ACCELERATOR"] = "cpu"
    ckpt = tmp_path / "ckpt"
    mp.spawn(_train_one_step, args=(2, str(ckpt), free_port(), stage), nprocs=2)
    expected = torch.load(ckpt / "expected.pt", weights_only=True)
    torch.manual_seed(0)
    initial = create_model("tiny").state_dict()

    config, state = zero_to_ours(ckpt, tmp_path / "fp32.safetensors")
    written = load_state_dict_file(tmp_path / "fp32.safetensors")
    assert config.name == "tiny" and set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k].float()) for k in expected)
    assert not torch.equal(written["visual.patch_embed.weight"], initial["visual.patch_embed.weight"])  # it trained

    zero_to_ours(ckpt, tmp_path / "bf16.safetensors", "tiny", torch.bfloat16)
    assert read_record(tmp_path / "bf16.safetensors")["dtype"] == "bfloat16"
    assert load_state_dict_file(tmp_path / "bf16.safetensors")["visual.pos_embed"].dtype == torch.bfloat16
    report = verify_state(tmp_path / "bf16.safetensors", state, config)
    assert report.image_cosine > 0.999 and report.text_cosine > 0.999


@pytest.mark.slow
def test_from_zero_verify_compares_with_the_trained_architecture(tmp_path, demo_data, clean_shm, monkeypatch, capsys):
    """A run of the demo recipe (``text.pool: masked_mean``) converted by from-zero: the file records the
    trained architecture, and --verify compares it with a model built from the checkpoint's recorded
    recipe and its fp32 weights, not with itself: a file written with the registry defaults instead
    (the overrides dropped) computes other text embeddings and --verify fails."""
    from conftest import PYTHON, dist_env, run_checked, train_args
    from rwkvclip_dist import pretrained_format
    from rwkvclip_dist.convert import pipeline
    from tool_loader import tool_main

    run = tmp_path / "run"
    run_checked([PYTHON, *train_args(run, demo_data, "train.steps=2", "checkpoint.every_steps=0")], timeout=300,
                env=dist_env())
    convert = tool_main("convert_checkpoint")
    good = tmp_path / "good.safetensors"
    assert convert(["from-zero", str(run / "checkpoints"), str(good), "--verify"]) == 0
    assert read_record(good)["overrides"] == {"text.pool": "masked_mean"}
    assert "verify: image cosine 1.00000000" in capsys.readouterr().out

    def registry_defaults(config, kind="clip", dtype=torch.float32):  # the converter's old mistake
        return {**pretrained_format.config_record(config, kind, dtype), "overrides": {}}

    monkeypatch.setattr(pipeline, "config_record", registry_defaults)
    wrong = tmp_path / "wrong.safetensors"
    assert convert(["from-zero", str(run / "checkpoints"), str(wrong), "--verify"]) == 1
    assert not wrong.exists()  # a failed verification leaves no unverified file behind (issue 21)
    captured = capsys.readouterr()
    text_cosine = float(re.search(r"text cosine ([0-9.]+)", captured.out).group(1))
    assert text_cosine < 0.999 and "verify failed" in captured.err, captured.out
