"""Scale on paper: per-GPU memory, communication and expected efficiency of B/16 and L/14 on 8-512 H100s,
and of the 4B towers under tensor parallel 1/2/4/8 x ZeRO 0-3 on 256.

Every model number comes from the model code itself, so the document stays true when a config changes:
parameter counts from the real modules built on the meta device; forward FLOPs from
``rwkvclip_dist.model.flops``; activation memory from the tensors autograd actually saves in one forward
pass of the real towers (recorded with ``saved_tensors_hooks`` on the meta device, bf16, one sample, every
tensor counted once by its storage). The hardware figures and the training-state layout are assumptions,
listed at the top of the generated document.

    python tools/scaling.py                      # print the Markdown
    python tools/scaling.py --write docs/scaling.md
    python tools/scaling.py --check docs/scaling.md   # exit 1 when the file is stale
"""
from __future__ import annotations

import argparse
import functools
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.model import get_model_config
from rwkvclip_dist.model import mixing
from rwkvclip_dist.model.clip import RWKVCLIP
from rwkvclip_dist.model.flops import forward_flops_per_sample
from rwkvclip_dist.model.mixing import DECAY_LORA_RANK
from rwkvclip_dist.parallel.tensor_parallel import PLAN, shard_model
from rwkvclip_dist.training.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]

GIB = 1024 ** 3
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512)
ZERO_STAGES = (0, 1, 2, 3)


@dataclass(frozen=True)
class Hardware:
    name: str = "H100 SXM 80 GB"
    memory_bytes: float = 80e9
    usable_fraction: float = 0.9
    """Share of device memory a run can plan on; the rest is CUDA context, NCCL buffers, fragmentation."""
    peak_flops: float = 989e12
    """Dense bf16 tensor-core peak per GPU."""
    mfu: float = 0.35
    """Assumed model FLOPs utilisation of the compute alone (Bi-WKV and the token-shift lerps are
    memory-bound, so below the ~45% that dense transformers reach)."""
    gpus_per_node: int = 8
    intra_node_bus_bw: float = 360e9
    """NCCL bus bandwidth inside a node (NVLink 4 / NVSwitch), bytes/s."""
    inter_node_bus_bw: float = 45e9
    """NCCL bus bandwidth per GPU across nodes: one 400 Gb/s NIC per GPU at ~90%, bytes/s."""
    latency_per_bucket: float = 100e-6
    """Fixed cost per bucketed collective call (launch and ring/tree latency), seconds."""


@dataclass(frozen=True)
class Workload:
    """What a training recipe asks of each GPU."""

    recipe: str
    """Recipe file (relative to the repository) this workload was read from."""
    model: str
    batch_per_gpu: int
    """Samples per GPU per optimizer step (``data.batch_size``; accumulation only splits it)."""
    checkpointing: bool
    """``model.activation_checkpointing``."""
    zero_stage: int
    bucket_elements: int
    """``parallel.reduce_bucket_size``: DeepSpeed buckets count elements (2 bytes each in bf16)."""
    tensor_parallel: int = 1
    """``parallel.tensor_parallel``: ``batch_per_gpu`` is then per tensor-parallel group."""

    @classmethod
    def from_recipe(cls, path: str) -> "Workload":
        recipe = load_recipe(ROOT / path, check_paths=False)  # sizes only; the data need not be here
        return cls(recipe=path, model=recipe.model.name, batch_per_gpu=recipe.data.batch_size,
                   checkpointing=recipe.model.activation_checkpointing, zero_stage=recipe.parallel.zero_stage,
                   bucket_elements=recipe.parallel.reduce_bucket_size, tensor_parallel=recipe.parallel.tensor_parallel)


RECIPES = ("recipes/rwkvclip_b16_laion.yaml", "recipes/rwkvclip_l14_laion.yaml")


@dataclass(frozen=True)
class ModelFacts:
    """What one sample costs, measured from the real modules."""

    name: str
    params: int
    embed_dim: int
    forward_flops: int
    outside_blocks_bytes: int
    """Activation bytes autograd keeps for backward outside the blocks (patch embedding, pooling), one sample."""
    blocks_bytes: int
    """Activation bytes autograd keeps inside all blocks together, one sample."""
    block_inputs_bytes: int
    """Sum over all blocks of each block's input: what checkpointing keeps."""
    largest_block_bytes: int
    """Saved bytes of the largest single block: recomputed one at a time under checkpointing."""

    @property
    def saved_bytes(self) -> int:
        """Activation bytes per sample without checkpointing."""
        return self.outside_blocks_bytes + self.blocks_bytes

    @property
    def checkpointed_bytes(self) -> int:
        """Activation bytes per sample with per-block checkpointing, at the peak of the backward pass."""
        return self.outside_blocks_bytes + self.block_inputs_bytes + self.largest_block_bytes


class _FusedBiWKV(torch.autograd.Function):
    """Stands in for the fused CUDA kernel, which keeps only its inputs for backward; the chunked CPU
    path would also keep its per-chunk intermediates, which a GPU run never holds."""

    @staticmethod
    def forward(ctx, r, k, v, w, u):
        ctx.save_for_backward(r, k, v, w, u)
        return torch.empty_like(r)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("shape-only stand-in; never differentiated")


@functools.lru_cache(maxsize=None)
def measure_model(name: str, tensor_parallel: int = 1) -> ModelFacts:
    """One sample's costs on one GPU; with ``tensor_parallel`` t, on one of t ranks: the model's local
    shard (``shard_model``: the same slices that the training run's ``parallelize`` keeps) is measured."""
    config = get_model_config(name)
    with torch.device("meta"):
        model = RWKVCLIP(config, initialize=False).to(torch.bfloat16)
    if tensor_parallel > 1:
        shard_model(model, 0, tensor_parallel)
    params = sum(p.numel() for p in model.parameters())
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}

    current = ["outside"]
    saved: dict[int, tuple[str, int]] = {}
    block_inputs = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        # Weights saved by matmuls are parameters, counted under model states, not activations.
        if storage._cdata not in param_storages and storage._cdata not in saved:
            saved[storage._cdata] = (current[0], storage.nbytes())
        return tensor

    def enter(label):
        def hook(module, args):
            nonlocal block_inputs
            block_inputs += args[0].numel() * args[0].element_size()
            current[0] = label
        return hook

    def leave(module, args, output):
        current[0] = "outside"

    blocks = [("image", i, b) for i, b in enumerate(model.visual.blocks)]
    blocks += [("text", i, b) for i, b in enumerate(model.text.blocks)]
    for tower, index, block in blocks:
        block.register_forward_pre_hook(enter(f"{tower}{index}"))
        block.register_forward_hook(leave)

    img = config.image
    images = torch.empty(1, img.in_channels, img.image_size, img.image_size, device="meta", dtype=torch.bfloat16)
    tokens = torch.zeros(1, config.text.context_length, device="meta", dtype=torch.long)
    # The output keeps the graph, and so every saved tensor, alive while they are counted: a freed
    # storage's address could otherwise be reused and a new tensor mistaken for a counted one.
    with mock.patch.object(mixing, "bi_wkv", _FusedBiWKV.apply), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        output = model.train()(images, tokens)

    per_block: dict[str, int] = {}
    for label, nbytes in saved.values():
        per_block[label] = per_block.get(label, 0) + nbytes
    outside = per_block.pop("outside", 0)
    del output
    return ModelFacts(
        name=name, params=params, embed_dim=config.embed_dim,
        forward_flops=forward_flops_per_sample(config, tensor_parallel),
        outside_blocks_bytes=outside, blocks_bytes=sum(per_block.values()), block_inputs_bytes=block_inputs,
        largest_block_bytes=max(per_block.values()),
    )


# ---- memory -----------------------------------------------------------------------------------------

def model_state_bytes(params: int, stage: int, gpus: int) -> dict[str, float]:
    """Per-GPU bytes of bf16 weights, bf16 gradients and fp32 master weights + Adam moments (12 B/param),
    partitioned as ZeRO stage ``stage`` does over ``gpus`` data-parallel ranks."""
    if stage not in ZERO_STAGES:
        raise ValueError(f"ZeRO stage must be one of {ZERO_STAGES}, got {stage}")
    weights = 2 * params / (gpus if stage >= 3 else 1)
    grads = 2 * params / (gpus if stage >= 2 else 1)
    optimizer = 12 * params / (gpus if stage >= 1 else 1)
    return {"weights": weights, "grads": grads, "optimizer": optimizer}


def loss_bytes(facts: ModelFacts, batch: int, gpus: int) -> float:
    """Local-loss logits: both directions, batch x global batch, fp32, plus their gradients, and the
    all-gathered fp32 features of both towers."""
    global_batch = batch * gpus
    return 2 * 2 * batch * global_batch * 4 + 2 * global_batch * facts.embed_dim * 4


def activation_bytes(facts: ModelFacts, batch: int, checkpointing: bool) -> float:
    return batch * (facts.checkpointed_bytes if checkpointing else facts.saved_bytes)


# ---- communication and time ---------------------------------------------------------------------------

def bus_bandwidth(hw: Hardware, gpus: int) -> float:
    # A ring spanning nodes runs at the speed of its slowest (inter-node) links.
    return hw.intra_node_bus_bw if gpus <= hw.gpus_per_node else hw.inter_node_bus_bw


def collective_traffic(params: int, embed_dim: int, batch: int, stage: int, gpus: int) -> dict[str, float]:
    """Bytes each GPU sends per optimizer step with ring collectives: all-reduce of S moves 2(n-1)/n S,
    reduce-scatter and all-gather (n-1)/n S each. Gradients and weights travel in bf16."""
    share = (gpus - 1) / gpus
    grads = 2 * params
    if stage == 0:
        reduce = 2 * share * grads  # one all-reduce
        gather = 0.0
    else:
        reduce = share * grads  # reduce-scatter
        # ZeRO-1/2 gather the updated weights once; ZeRO-3 gathers them for forward and again for backward.
        gather = share * 2 * params * (2 if stage == 3 else 1)
    features = 2 * batch * gpus * embed_dim * 4
    # gather_with_grad: all-gather forward, reduce-scatter of the feature gradients backward.
    loss = 2 * share * features
    return {"reduce": reduce, "gather": gather, "loss": loss}


def step_times(facts: ModelFacts, work: Workload, hw: Hardware, stage: int, gpus: int) -> dict[str, float]:
    passes = 4 if work.checkpointing else 3  # forward + 2x backward (+ recomputed forward)
    compute = passes * facts.forward_flops * work.batch_per_gpu / (hw.peak_flops * hw.mfu)
    traffic = collective_traffic(facts.params, facts.embed_dim, work.batch_per_gpu, stage, gpus)
    calls = math.ceil(facts.params / work.bucket_elements) * (1 if stage == 0 else (2 if stage < 3 else 3)) + 2
    comm = sum(traffic.values()) / bus_bandwidth(hw, gpus) + calls * hw.latency_per_bucket
    return {"compute": compute, "comm": comm,
            "eff_serial": compute / (compute + comm), "eff_overlap": compute / max(compute, comm)}


# ---- tensor parallelism ---------------------------------------------------------------------------------

TP_RECIPES = ("recipes/rwkvclip_4b_laion.yaml", "recipes/rwkvclip_4b_448_laion.yaml")
TP_DEGREES = (1, 2, 4, 8)
TP_GPUS = 256
"""GPU count of the tensor-parallel tables (the recipes' header says the same)."""


def tensor_parallel_all_reduces() -> dict[str, int]:
    """All-reduces per block that tensor parallelism adds, read from the split plan of
    ``rwkvclip_dist.parallel.tensor_parallel``: a row-parallel layer (weight split along its input)
    all-reduces its output in every forward pass; a column-parallel layer (split along its output)
    all-reduces its input's gradient in the backward pass. The decay LoRA's 64-wide hidden layer adds
    one more backward all-reduce, counted apart."""
    kinds = [split.kind for table in PLAN.values() for split in table.values()]
    return {"forward": kinds.count("row"), "backward": kinds.count("column")}


@dataclass(frozen=True)
class TensorParallelPlan:
    """One (TP degree, ZeRO stage) cell for a recipe on ``TP_GPUS`` GPUs at the recipe's global batch."""

    tp: int
    stage: int
    group_batch: int
    """Samples per TP group (every rank of the group holds them) per optimizer step."""
    micro_batch: int
    """Largest power-of-two micro-batch that fits; 0 when none does."""
    memory: float
    dp_bytes: float
    tp_bytes: float
    compute: float
    comm: float


def plan(work: Workload, hw: Hardware, tp: int, stage: int, one_micro_batch: bool = False) -> TensorParallelPlan:
    """``one_micro_batch``: the group's samples in one micro-batch whatever the memory (an upper bound
    for what sequence parallelism could buy)."""
    facts, config = measure_model(work.model, tp), get_model_config(work.model)
    dp = TP_GPUS // tp
    group_batch = work.batch_per_gpu * TP_GPUS // work.tensor_parallel // dp
    usable = hw.memory_bytes * hw.usable_fraction

    def memory(micro: int) -> float:
        return (sum(model_state_bytes(facts.params, stage, dp).values()) + activation_bytes(facts, micro, work.checkpointing)
                + loss_bytes(facts, group_batch, dp))

    micro = group_batch
    while micro >= 1 and memory(micro) > usable and not one_micro_batch:
        micro //= 2
    parts = group_batch // max(micro, 1)
    with_grad = 1 + work.checkpointing  # forward passes that keep a graph (and recompute it)
    extra = 1 if parts > 1 else 0  # accumulation's first pass, without gradient (training.accumulation)
    share = (dp - 1) / dp
    weights = 2 * facts.params
    dp_bytes = {0: 2 * share * weights, 1: 2 * share * weights, 2: share * weights * (parts + 1),
                3: share * weights * parts * (1 + with_grad + 1 + extra)}[stage]
    dp_bytes += share * 2 * group_batch * dp * facts.embed_dim * 4 * (2 if parts == 1 else 1 + 2 * parts)
    reduces = tensor_parallel_all_reduces()
    tokens = {"image": config.image.num_patches, "text": config.text.context_length}
    towers = [(tokens[n], getattr(config, n)) for n in tokens]
    full = sum(t.depth * n * t.width * 2 for n, t in towers)
    decay = sum(t.depth * n * DECAY_LORA_RANK * 2 for n, t in towers)
    per_sample = reduces["forward"] * (with_grad + extra) * full + reduces["backward"] * full + decay
    tp_bytes = 2 * (tp - 1) / tp * group_batch * per_sample
    blocks = config.image.depth + config.text.depth
    calls = (blocks * (reduces["forward"] * (with_grad + extra) + reduces["backward"] + 1) * parts if tp > 1 else 0)
    calls += math.ceil(facts.params / work.bucket_elements) * (2 if stage < 3 else 2 + parts * (with_grad + 1 + extra))
    compute = (3 + work.checkpointing + extra) * facts.forward_flops * group_batch / (hw.peak_flops * hw.mfu)
    comm = dp_bytes / bus_bandwidth(hw, TP_GPUS) + tp_bytes / hw.intra_node_bus_bw + calls * hw.latency_per_bucket
    return TensorParallelPlan(tp, stage, group_batch, micro if micro >= 1 else 0,
                              memory(max(micro, 1)), dp_bytes, tp_bytes, compute, comm)


# ---- document -----------------------------------------------------------------------------------------

def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def render(facts_list: list[ModelFacts], workloads: tuple[Workload, ...], hw: Hardware) -> str:
    usable = hw.memory_bytes * hw.usable_fraction
    out = [
        "# Scaling on paper: B/16 and L/14 on 8 to 512 H100s, the 4B towers under tensor parallelism",
        "",
        "<!-- Generated by `python tools/scaling.py --write docs/scaling.md`; do not edit by hand. -->",
        "",
        "Model figures are measured from the model code (parameters on the meta device, activations from",
        "the tensors autograd saves in one bf16 forward pass, FLOPs from `rwkvclip_dist.model.flops`).",
        "Everything else rests on these assumptions:",
        "",
        f"- {hw.name}: {hw.memory_bytes / 1e9:.0f} GB, of which {hw.usable_fraction:.0%} is planned on; "
        f"{hw.peak_flops / 1e12:.0f} TFLOP/s dense bf16 peak at an assumed MFU of {hw.mfu:.0%} for compute alone.",
        f"- NCCL bus bandwidth {hw.intra_node_bus_bw / 1e9:.0f} GB/s within a node of {hw.gpus_per_node}, "
        f"{hw.inter_node_bus_bw / 1e9:.0f} GB/s per GPU across nodes (one 400 Gb/s NIC per GPU); "
        f"{hw.latency_per_bucket * 1e6:.0f} us per bucketed collective; ring traffic (all-reduce 2(n-1)/n of "
        "the payload per GPU, reduce-scatter and all-gather (n-1)/n each).",
        "- Mixed precision as DeepSpeed bf16 runs it: bf16 weights and gradients (2 + 2 bytes/param), fp32 master",
        "  weights and Adam moments (12 bytes/param); ZeRO-1 partitions the 12, ZeRO-2 also the gradients,",
        "  ZeRO-3 also the weights (the ZeRO paper's accounting; DeepSpeed's bf16 optimizer also keeps an fp32",
        "  gradient for its partition, 4 more bytes/param divided like the optimizer states). Gradients and",
        "  weights are communicated in bf16.",
        "- Activations: bf16, the fused Bi-WKV kernel keeps only its inputs. With checkpointing each block keeps",
        "  its input and one block at a time is recomputed; a step then costs 4 forward passes instead of 3.",
        "- Contrastive loss with local loss and gather-with-grad: fp32 features all-gathered (and their gradients",
        "  reduce-scattered), logits batch x global batch in both directions, with gradients.",
        "- Efficiency = compute time / step time, either with no overlap of communication and compute (a lower",
        "  bound) or with full overlap (an upper bound; ZeRO-1/2 `overlap_comm` gets close for the reduce-scatter).",
        "",
        "## Models",
        "",
        "| model | parameters | forward GFLOPs/sample | activations/sample | with checkpointing |",
        "|---|---:|---:|---:|---:|",
    ]
    for f in facts_list:
        out.append(f"| {f.name} | {f.params:,} | {f.forward_flops / 1e9:.1f} | {f.saved_bytes / 2**20:.1f} MiB "
                   f"| {f.checkpointed_bytes / 2**20:.1f} MiB |")
    for facts, work in zip(facts_list, workloads):
        b, stage = work.batch_per_gpu, work.zero_stage
        out += ["", f"## {facts.name}: {b} samples per GPU (`{work.recipe}`)", "",
                f"The recipe runs ZeRO-{work.zero_stage}, activation checkpointing "
                f"{'on' if work.checkpointing else 'off'}.", "",
                "Model states per GPU (GiB: weights + gradients + optimizer = total), by ZeRO stage:", "",
                "| GPUs | " + " | ".join(f"ZeRO-{s}" for s in ZERO_STAGES) + " |",
                "|---:|" + "---:|" * len(ZERO_STAGES)]
        for n in GPU_COUNTS:
            cells = []
            for s in ZERO_STAGES:
                st = model_state_bytes(facts.params, s, n)
                cells.append(f"{_gib(st['weights'])} + {_gib(st['grads'])} + {_gib(st['optimizer'])} = "
                             f"{_gib(sum(st.values()))}")
            out.append(f"| {n} | " + " | ".join(cells) + " |")
        act_off = activation_bytes(facts, b, False)
        act_on = activation_bytes(facts, b, True)
        out += ["", f"Activations per GPU: {_gib(act_off)} GiB without checkpointing, {_gib(act_on)} GiB with.",
                f"Total per GPU (GiB), loss buffers included; `*` marks a total over the "
                f"{usable / GIB:.0f} GiB planned on:", "",
                f"| GPUs | global batch | loss buffers | ZeRO-{stage}, no checkpointing | ZeRO-{stage}, checkpointing "
                "| ZeRO-3, checkpointing |", "|---:|---:|---:|---:|---:|---:|"]
        for n in GPU_COUNTS:
            loss = loss_bytes(facts, b, n)

            def total(stage: int, act: float) -> str:
                value = sum(model_state_bytes(facts.params, stage, n).values()) + act + loss
                return _gib(value) + ("*" if value > usable else "")

            out.append(f"| {n} | {b * n:,} | {_gib(loss)} | {total(stage, act_off)} | {total(stage, act_on)} "
                       f"| {total(3, act_on)} |")
        mode = "with" if work.checkpointing else "without"
        out += ["", f"Communication and time per step ({mode} checkpointing). Traffic is bytes sent per GPU: "
                "gradient all-reduce (ZeRO-0) or reduce-scatter, weight all-gather for ZeRO-1/2 and ZeRO-3, "
                "and the loss features. Efficiency: no overlap / full overlap.", "",
                "| GPUs | compute s | grads GB (0 / 1-3) | gather GB (1-2 / 3) | loss MB | comm s (0 / 1-2 / 3) "
                "| eff. ZeRO-0 | eff. ZeRO-1/2 | eff. ZeRO-3 | samples/s, ZeRO-1/2 |",
                "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for n in GPU_COUNTS:
            t = {s: step_times(facts, work, hw, s, n) for s in (0, 2, 3)}
            tr = {s: collective_traffic(facts.params, facts.embed_dim, b, s, n) for s in (0, 2, 3)}
            eff = {s: f"{t[s]['eff_serial']:.0%} / {t[s]['eff_overlap']:.0%}" for s in t}
            out.append(f"| {n} | {t[0]['compute']:.3f} | {tr[0]['reduce'] / 1e9:.2f} / {tr[2]['reduce'] / 1e9:.2f} "
                       f"| {tr[2]['gather'] / 1e9:.2f} / {tr[3]['gather'] / 1e9:.2f} | {tr[2]['loss'] / 1e6:.1f} "
                       f"| {t[0]['comm']:.3f} / {t[2]['comm']:.3f} / {t[3]['comm']:.3f} "
                       f"| {eff[0]} | {eff[2]} | {eff[3]} "
                       f"| {n * b / (t[2]['compute'] + t[2]['comm']):,.0f} |")
    out += ["", "## Reading the tables", "",
            "- From 8 to 16 GPUs the ring leaves NVLink for the network, so communication time jumps by the",
            "  ratio of the two assumed bus bandwidths. Beyond that, the gradient and weight traffic per GPU",
            "  hardly grows with n (the (n-1)/n factor); what grows is the loss: its feature all-gather and",
            "  its logits scale with the global batch, which is why efficiency still falls slowly up to 512 GPUs.",
            "- ZeRO-2 moves the same bytes as ZeRO-0 (a reduce-scatter plus an all-gather equal one all-reduce)",
            "  and removes most of the optimizer memory; ZeRO-3 adds a second weight all-gather per step and",
            "  pays off only when the weights themselves no longer fit.",
            "- samples/s assumes no overlap (the lower bound) and no data-loading stalls.",
            ""]
    return "\n".join(out)


def render_tensor_parallel(workloads: tuple[Workload, ...], hw: Hardware) -> str:
    usable = hw.memory_bytes * hw.usable_fraction
    reduces = tensor_parallel_all_reduces()
    out = ["## Tensor parallel x ZeRO: the largest configurations", "",
           f"{TP_GPUS} GPUs at each recipe's global batch. A tensor-parallel (TP) group of t GPUs splits every "
           "tower's heads and channel-mix hidden units t ways (`parallel.tensor_parallel`), and all t GPUs hold "
           "the group's samples, so at a fixed global batch a group holds t times the samples of one GPU at TP 1. "
           "Micro-batches (`train.accumulation_steps`, exact for the contrastive loss) halve until the total fits "
           f"the {usable / GIB:.0f} GiB planned on; accumulation costs one more forward pass without gradient. "
           f"Per block and pass TP adds {reduces['forward']} all-reduces of the block's activations in the forward "
           f"pass (row-parallel outputs) and {reduces['backward']} in the backward pass (column-parallel input "
           "gradients; the token-shift lerps feed receptance, key, value and gate separately), plus one 64 wide; "
           "they run inside a node (NVLink). ZeRO partitions over the data-parallel (DP) group only."]
    for work in workloads:
        plans = {(t, s): plan(work, hw, t, s) for t in TP_DEGREES for s in ZERO_STAGES}
        global_batch = work.batch_per_gpu * TP_GPUS // work.tensor_parallel
        out += ["", f"### {work.model} (`{work.recipe}`), global batch {global_batch:,}", "",
                "| TP | DP | samples per group | params per GPU | fwd GFLOPs/sample per GPU | checkpointed "
                "activations/sample (block inputs) | TP all-reduce GB/step per GPU |",
                "|---:|---:|---:|---:|---:|---:|---:|"]
        for t in TP_DEGREES:
            facts, p = measure_model(work.model, t), plans[(t, work.zero_stage)]
            out.append(f"| {t} | {TP_GPUS // t} | {p.group_batch:,} | {facts.params / 1e9:.2f} B "
                       f"| {facts.forward_flops / 1e9:,.0f} | {facts.checkpointed_bytes / 2**20:.0f} MiB "
                       f"({facts.block_inputs_bytes / 2**20:.0f} MiB) | {p.tp_bytes / 1e9:,.0f} |")
        out += ["", "Memory per GPU (GiB) at the largest micro-batch that fits (in brackets); `-`: none fits:", "",
                "| TP | " + " | ".join(f"ZeRO-{s}" for s in ZERO_STAGES) + " |", "|---:|" + "---:|" * len(ZERO_STAGES)]
        for t in TP_DEGREES:
            cells = [f"{_gib(plans[(t, s)].memory)} ({plans[(t, s)].micro_batch})" if plans[(t, s)].micro_batch
                     else "-" for s in ZERO_STAGES]
            out.append(f"| {t} | " + " | ".join(cells) + " |")
        out += ["", "Communication per step per GPU (GB sent: DP gradients, weights and loss features by ZeRO stage; "
                "TP activations) and time per step, no overlap:", "",
                "| TP | DP GB, ZeRO-0 / 1 / 2 / 3 | TP GB | compute s (ZeRO-2) | comm s, ZeRO-0 / 1 / 2 / 3 "
                "| samples/s, ZeRO-0 / 1 / 2 / 3 |", "|---:|---:|---:|---:|---:|---:|"]
        for t in TP_DEGREES:
            row = [plans[(t, s)] for s in ZERO_STAGES]
            out.append(f"| {t} | {' / '.join(f'{p.dp_bytes / 1e9:.1f}' for p in row)} | {row[2].tp_bytes / 1e9:,.0f} "
                       f"| {row[2].compute:.2f} | {' / '.join(f'{p.comm:.2f}' for p in row)} "
                       f"| {' / '.join(f'{global_batch / (p.compute + p.comm):,.0f}' for p in row)} |")
    largest = workloads[-1]
    cells = [plan(largest, hw, t, s) for t in TP_DEGREES for s in ZERO_STAGES]
    best = max((p for p in cells if p.micro_batch), key=lambda p: 1 / (p.compute + p.comm))
    facts, plain = measure_model(largest.model, 1), plan(largest, hw, 1, 0)
    ratio = plan(largest, hw, 2, 2).tp_bytes / plan(largest, hw, 1, 2).dp_bytes
    bound = plan(largest, hw, 2, best.stage, one_micro_batch=True)
    global_batch = largest.batch_per_gpu * TP_GPUS // largest.tensor_parallel
    inputs = facts.block_inputs_bytes / facts.checkpointed_bytes
    out += ["", "### What the tables say", "",
            f"- {largest.model}'s model states are {16 * facts.params / GIB:.0f} GiB at 16 bytes/param: without "
            f"ZeRO (stage 0) a GPU at TP 1 has room for {plain.micro_batch} samples per micro-batch, and TP is what "
            "makes it fit. ZeRO-1 or 2 over the data-parallel group fits it at TP 1 instead, because contrastive "
            "training at these batch sizes is activation-heavy and weight-light: what fills a GPU is the activations "
            "of its samples, which TP shrinks little (the residual stream, the token-shift lerps and their LoRA "
            "stay whole on every rank).",
            "- TP's all-reduces carry activations (batch x tokens x width per block), ZeRO's traffic is the weights, "
            f"about once per step: at TP 2 the former is {ratio:.0f} times the latter at TP 1, so every doubling of "
            f"TP costs throughput. Fastest for {largest.model}: TP {best.tp}, ZeRO-{best.stage} ({best.micro_batch} "
            "samples per micro-batch), which the recipes use.",
            f"- Sequence parallelism (block inputs and norms split over tokens) is not implemented: the block inputs "
            f"are {inputs:.0%} of {largest.model}'s checkpointed activations, so it would let a TP group hold more "
            "samples per micro-batch, but it matters only at TP > 1, which these tables rule out for throughput "
            f"(even with all {bound.group_batch} samples of a group in one micro-batch, TP 2 would run at "
            f"{global_batch / (bound.compute + bound.comm):,.0f} samples/s against "
            f"{global_batch / (best.compute + best.comm):,.0f} at TP {best.tp}); and for RWKV it would split less "
            "than for a transformer, since the token shift needs each token's neighbours (the rows above and below, "
            "for Q-shift) before the column-parallel layers.",
            "- TP becomes the better trade where weights outgrow activations: much wider towers at small per-GPU "
            "batch, or a job with few data-parallel ranks.", ""]
    return "\n".join(out)


def generate(hw: Hardware | None = None, recipes: tuple[str, ...] = RECIPES,
             tp_recipes: tuple[str, ...] = TP_RECIPES) -> str:
    hw = hw or Hardware()
    workloads = tuple(Workload.from_recipe(path) for path in recipes)
    facts = [measure_model(w.model) for w in workloads]
    return render(facts, workloads, hw) + "\n" + render_tensor_parallel(
        tuple(Workload.from_recipe(path) for path in tp_recipes), hw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scaling.py", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--write", type=Path, help="write the Markdown to this file")
    group.add_argument("--check", type=Path, help="exit 1 if this file differs from what the script produces")
    return run_tool(parser, run, argv)


def run(args: argparse.Namespace) -> int:
    text = generate()
    if args.write:
        args.write.write_text(text)
    elif args.check:
        if not args.check.is_file():
            print(f"{args.check}: missing; run python tools/scaling.py --write {args.check}", file=sys.stderr)
            return 1
        if args.check.read_text() != text:
            print(f"{args.check} is stale; regenerate with python tools/scaling.py --write {args.check}",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
