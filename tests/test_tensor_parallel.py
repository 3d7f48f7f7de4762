"""Tensor parallelism (megatron-core layers on 2 gloo ranks) against the plain model: the same
outputs and every gradient, the split parameters' gradients equal to the matching slice of the plain
model's, the replicated parameters' gradients identical on both TP ranks; and the merge of the TP
shards back into one plain state dict."""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from rwkvclip_dist.model.registry import create_model, get_model_config
from rwkvclip_dist.parallel.tensor_parallel import merge_shards, shard_model, split_dims, tensor_parallel_problems

# A narrow model of B/32's shape: 224 px in 32 px patches, head sizes 80 / 64, two heads per tower.
NARROW_B32 = {"image": {"width": 160, "depth": 2, "ffn_dim": 800, "drop_path_rate": 0.0},
              "text": {"width": 128, "depth": 2, "ffn_dim": 448}, "embed_dim": 96}
CASES = {"tiny": ("tiny", {}, False), "tiny_checkpointing": ("tiny", {}, True),
         "narrow_b32": ("RWKV-CLIP-B-32", NARROW_B32, False)}


def _inputs(config, batch: int = 2):
    gen = torch.Generator().manual_seed(3)
    size = config.image.image_size
    images = torch.randn(batch, 3, size, size, generator=gen)
    tokens = torch.randint(1, 400, (batch, config.text.context_length), generator=gen)
    return images, tokens


def _objective(out: dict) -> torch.Tensor:
    # Weighted so that every feature coordinate gets its own gradient (a plain sum of unit vectors would not).
    gen = torch.Generator().manual_seed(5)
    weights = {k: torch.randn(out[k].shape, generator=gen) for k in ("image_features", "text_features")}
    return sum((out[k] * w).sum() for k, w in weights.items()) + out["logit_scale"].sum()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def worker(out_path: str) -> None:
    """Each of 2 gloo ranks (torchrun): plain model vs its TP=2 part, for every case."""
    import torch.distributed as dist

    from rwkvclip_dist.parallel.groups import init_parallel_groups
    from rwkvclip_dist.parallel.tensor_parallel import parallelize

    dist.init_process_group("gloo")
    groups = init_parallel_groups(2)
    results = {}
    for case, (name, overrides, checkpointing) in CASES.items():
        torch.manual_seed(0)
        plain = create_model(name, **overrides)
        parallel = parallelize(copy.deepcopy(plain), groups)
        parallel.set_activation_checkpointing(checkpointing)
        images, tokens = _inputs(plain.config)
        outputs = {}
        for label, model in (("plain", plain), ("tp", parallel)):
            out = model(images, tokens)
            _objective(out).backward()
            outputs[label] = out
        errors = {f"output {k}": _rel(outputs["tp"][k].detach(), outputs["plain"][k].detach())
                  for k in outputs["plain"]}
        dims = split_dims(plain)
        plain_params = dict(plain.named_parameters())
        disagree = []
        for pname, param in parallel.named_parameters():
            reference = plain_params[pname].grad
            if pname in dims:
                reference = reference.chunk(2, dims[pname])[groups.tp_rank]
            else:
                other = [torch.empty_like(param.grad) for _ in range(2)]
                dist.all_gather(other, param.grad, group=groups.tp_group)
                if not torch.equal(other[0], other[1]):
                    disagree.append(pname)
            errors[f"grad {pname}"] = _rel(param.grad, reference)
        gathered = [None, None]
        dist.all_gather_object(gathered, {k: v.detach() for k, v in parallel.state_dict().items()
                                          if not k.endswith("_extra_state")}, group=groups.tp_group)
        merged = merge_shards(gathered, dims)
        merge_exact = all(torch.equal(merged[k], v) for k, v in plain.state_dict().items()) and merged.keys() == plain.state_dict().keys()
        results[case] = {"max_error": max(errors.values()), "worst": max(errors, key=errors.get),
                         "n_params": len(errors), "replicated_disagree": disagree, "merge_exact": merge_exact}
    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump(results, handle)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory):
    from conftest import dist_env, run_checked, launch_cmd

    out = tmp_path_factory.mktemp("tp") / "results.json"
    run_checked(launch_cmd(2, __file__, str(out)), timeout=300, env=dist_env())
    return json.loads(out.read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_parallel_equals_the_plain_model(tp_results, case):
    result = tp_results[case]
    assert result["n_params"] > 20
    assert result["max_error"] <= 1e-5, f"{case}: worst {result['worst']} at {result['max_error']:.2e}"
    assert result["replicated_disagree"] == [], "replicated parameters whose gradients differ between TP ranks"
    assert result["merge_exact"], "merging the TP shards did not give back the plain state dict"


def test_shard_model_keeps_the_local_part_of_every_split_parameter():
    torch.manual_seed(0)
    plain = create_model("tiny")
    local = shard_model(copy.deepcopy(plain), rank=1, size=2)
    dims, full = split_dims(plain), dict(plain.named_parameters())
    for name, param in local.named_parameters():
        expected = full[name].chunk(2, dims[name])[1] if name in dims else full[name]
        assert torch.equal(param, expected), name
    assert len(dims) == 2 * 2 * (10 + 2)  # two towers of two blocks: 10 split in a time mix, 2 in a channel mix
    assert local.visual.blocks[0].att.ln_x.num_groups == plain.visual.blocks[0].att.ln_x.num_groups // 2


def test_head_counts_that_do_not_split_are_named():
    config = get_model_config("tiny")  # 4 heads per tower, ffn 256 / 224
    assert tensor_parallel_problems(config, 2) == []
    problems = tensor_parallel_problems(config, 3)
    assert any("image tower has 4 heads" in p for p in problems)
    assert any("text.ffn_dim=224 is not divisible by tensor_parallel=3" in p for p in problems)


def test_the_model_knows_nothing_of_megatron_or_deepspeed():
    """Parallelism is applied to the model from parallel/, never written into it."""
    import ast
    from pathlib import Path

    import rwkvclip_dist.model

    for path in Path(rwkvclip_dist.model.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] in ("megatron", "deepspeed") for n in names), f"{path.name} imports {names}"


if __name__ == "__main__":
    worker(sys.argv[1])
