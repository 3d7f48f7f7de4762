"""Scale on paper, the model: per-GPU memory, communication and step time of a recipe's workload on
N GPUs under ZeRO 0-3 and tensor parallelism, from numbers measured on the model code itself
(``tools/scaling.py`` renders them as docs/scaling.md; tests/test_slurm_scaling.py checks them).

Parameter counts come from the real modules built on the meta device; forward FLOPs from
``rwkvclip_dist.model.flops``; activation memory from the tensors autograd actually saves in one
forward pass of the real towers (``saved_tensors_hooks`` on the meta device, bf16, one sample, every
tensor counted once by its storage; Bi-WKV on meta tensors keeps what the fused kernel keeps). The
hardware figures (:class:`Hardware`) and the training-state layout are assumptions.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rwkvclip_dist.model import get_model_config
from rwkvclip_dist.model.clip import RWKVCLIP
from rwkvclip_dist.model.flops import forward_flops_per_sample
from rwkvclip_dist.model.mixing import DECAY_LORA_RANK
from rwkvclip_dist.parallel.tensor_parallel import PLAN, shard_model
from rwkvclip_dist.training.recipe import load_recipe

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
    def from_recipe(cls, path: str, root: Path = Path(".")) -> "Workload":
        """The workload of recipe ``root / path`` (``path`` is what the document names)."""
        recipe = load_recipe(root / path, check_paths=False)  # sizes only; the data need not be here
        return cls(recipe=path, model=recipe.model.name, batch_per_gpu=recipe.data.batch_size,
                   checkpointing=recipe.model.activation_checkpointing, zero_stage=recipe.parallel.zero_stage,
                   bucket_elements=recipe.parallel.reduce_bucket_size, tensor_parallel=recipe.parallel.tensor_parallel)


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
    # Bi-WKV on meta tensors keeps what the fused kernel keeps, its inputs (ops' dispatch rule).
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
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
