"""tools/scaling.py: the committed docs/scaling.md is what the script produces, and the numbers it is
built from (rwkvclip_dist/training/scaling.py) agree with the model code they claim to come from."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rwkvclip_dist import create_model, get_model_config
from rwkvclip_dist.training import scaling

ROOT = Path(__file__).resolve().parents[1]
SPEC_B16_PARAMS = 148_181_121  # SPEC section 7


def _load_tool():
    spec = importlib.util.spec_from_file_location("scaling_tool", ROOT / "tools" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module's globals through sys.modules
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def test_committed_doc_is_current(tmp_path, capsys):
    assert tool.main(["--check", str(ROOT / "docs" / "scaling.md")]) == 0, capsys.readouterr().err
    stale = tmp_path / "scaling.md"
    stale.write_text((ROOT / "docs" / "scaling.md").read_text().replace("| 8 |", "| 9 |", 1))
    assert tool.main(["--check", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err


def test_parameters_match_the_real_modules():
    tiny = scaling.measure_model("tiny")
    assert tiny.params == sum(p.numel() for p in create_model("tiny").parameters())
    assert scaling.measure_model("RWKV-CLIP-B-16").params == SPEC_B16_PARAMS


def test_checkpointing_keeps_exactly_the_block_inputs():
    facts = scaling.measure_model("tiny")
    config = get_model_config("tiny")
    bf16 = torch.finfo(torch.bfloat16).bits // 8
    expected_inputs = bf16 * (config.image.depth * config.image.num_patches * config.image.width
                              + config.text.depth * config.text.context_length * config.text.width)
    assert facts.block_inputs_bytes == expected_inputs
    # Every block keeps far more than its input (lerps, r/k/v/w, the channel-mix hidden state).
    assert facts.largest_block_bytes > 10 * config.image.num_patches * config.image.width * bf16
    assert facts.block_inputs_bytes < facts.checkpointed_bytes < facts.saved_bytes


def test_zero_stages_partition_what_they_promise():
    params, gpus = 1_000_000, 64
    states = {s: scaling.model_state_bytes(params, s, gpus) for s in scaling.ZERO_STAGES}
    assert sum(states[0].values()) == 16 * params
    assert sum(states[3].values()) == pytest.approx(16 * params / gpus)
    assert states[1]["optimizer"] == states[0]["optimizer"] / gpus and states[1]["grads"] == states[0]["grads"]
    assert states[2]["grads"] == states[0]["grads"] / gpus and states[2]["weights"] == states[0]["weights"]
    with pytest.raises(ValueError, match="ZeRO stage"):
        scaling.model_state_bytes(params, 4, gpus)


def test_reduce_scatter_plus_all_gather_moves_one_all_reduce():
    zero0 = scaling.collective_traffic(10_000_000, 512, 64, 0, 32)
    zero2 = scaling.collective_traffic(10_000_000, 512, 64, 2, 32)
    zero3 = scaling.collective_traffic(10_000_000, 512, 64, 3, 32)
    assert zero2["reduce"] + zero2["gather"] == pytest.approx(zero0["reduce"])
    assert zero3["gather"] == pytest.approx(2 * zero2["gather"])


def test_tensor_parallel_rows_measure_the_shard_a_rank_keeps():
    """The TP tables measure the same slices that training keeps (parallel.tensor_parallel.shard_model),
    and the FLOPs formula for one TP rank adds up: t ranks do the split work once and the whole work
    (token-shift LoRA, channel-mix receptance, ...) t times."""
    from rwkvclip_dist.model.flops import forward_flops_per_sample
    from rwkvclip_dist.parallel.tensor_parallel import shard_model

    torch.manual_seed(0)
    local = shard_model(create_model("tiny"), rank=1, size=2)
    assert scaling.measure_model("tiny", 2).params == sum(p.numel() for p in local.parameters())
    config = get_model_config("RWKV-CLIP-4B-14")
    one, two, four = (forward_flops_per_sample(config, t) for t in (1, 2, 4))
    split, whole = 2 * (one - two), 2 * two - one  # one = split + whole, two = split / 2 + whole
    assert four == pytest.approx(split / 4 + whole, rel=1e-9) and 0 < whole < 0.2 * one
    # What the all-reduce count is read from: two row-parallel and five column-parallel layers per block.
    assert scaling.tensor_parallel_all_reduces() == {"forward": 2, "backward": 5}


def test_the_largest_recipe_fits_without_accumulation_and_its_states_need_sharding():
    work = scaling.Workload.from_recipe("recipes/rwkvclip_4b_448_laion.yaml")
    hw = scaling.Hardware()
    assert scaling.measure_model(work.model).params * 16 > 0.75 * hw.memory_bytes  # states alone: ZeRO-0 at TP 1 barely fits
    recipe_cell = scaling.plan(work, hw, work.tensor_parallel, work.zero_stage)
    assert recipe_cell.micro_batch == recipe_cell.group_batch  # the recipe needs no accumulation
    assert recipe_cell.memory <= hw.memory_bytes * hw.usable_fraction
