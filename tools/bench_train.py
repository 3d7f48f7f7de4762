"""Training-step benchmark: RWKV-CLIP against open_clip's ViT CLIP (PyTorch SDPA), side by side.

    python tools/bench_train.py --out bench_train.json              # GPU: the default case list
    python tools/bench_train.py --cases rwkv-b16:448:ckpt vit-b16:448:ckpt --steps 5
    python tools/bench_train.py --tiny --out /tmp/t.json             # CPU smoke test (CI)
    python tools/bench_train.py --cases rwkv-b16:224 --profile rwkv-b16:224   # + top kernels

A case is MODEL:IMAGE_SIZE[:ckpt] (ckpt = activation checkpointing). Models: rwkv-b16, rwkv-l14
(this project's RWKV-CLIP-B-16 / -L-14), vit-b16, vit-l14 (open_clip's ViT-B-16 / ViT-L-14, built
for the case's image size, so their position embeddings cover the larger grid; attention is
nn.MultiheadAttention, i.e. torch's scaled_dot_product_attention), and with --tiny rwkv-tiny and
vit-tiny (32 px, 4 px patches, two layers). Both models of a size get the same batch.

One step is what training does: forward of both towers under bf16 autocast (fp32 weights, as
open_clip trains), the project's contrastive loss (rwkvclip_dist.loss.ClipLoss), backward and an
AdamW step (fused on CUDA). After warm-up steps, the median of the timed steps (CUDA events on a
GPU). Reported per case: images/s, peak memory (max allocated), and MFU = training FLOPs per image
(analytic forward FLOPs x 3, x 4 with checkpointing; rwkvclip_dist.model.flops for RWKV-CLIP, the
same counting rules below for the ViT) x images/s / the GPU's dense bf16 peak. For RWKV cases the
Bi-WKV calls per implementation (rwkvclip_dist.ops.dispatch_counts) say whether the fused kernel ran.
A case that runs out of GPU memory is recorded as OOM; any other error fails the run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rwkvclip_dist import create_model, ops
from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.loss import ClipLoss
from rwkvclip_dist.model.flops import forward_flops_per_sample
from rwkvclip_dist.outputs import strict_json

# Dense bf16 tensor-core peaks (datasheets, SXM parts); MFU is against these.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}
# Per-GPU batch by image size: the same for both models of a case pair.
DEFAULT_BATCH = {224: 128, 448: 64, 896: 16}
DEFAULT_CASES = ["rwkv-b16:224", "vit-b16:224", "rwkv-b16:224:ckpt", "vit-b16:224:ckpt",
                 "rwkv-b16:448", "vit-b16:448", "rwkv-b16:448:ckpt", "vit-b16:448:ckpt",
                 "rwkv-b16:896:ckpt", "vit-b16:896:ckpt", "rwkv-l14:224:ckpt", "vit-l14:224:ckpt"]
TINY_CASES = ["rwkv-tiny:32", "vit-tiny:32", "rwkv-tiny:32:ckpt", "vit-tiny:32:ckpt"]
RWKV_NAMES = {"rwkv-b16": "RWKV-CLIP-B-16", "rwkv-l14": "RWKV-CLIP-L-14", "rwkv-tiny": "tiny"}
VIT_NAMES = {"vit-b16": "ViT-B-16", "vit-l14": "ViT-L-14"}


@dataclass
class Case:
    model: str
    image_size: int
    checkpointing: bool

    @classmethod
    def parse(cls, text: str) -> "Case":
        parts = text.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] != "ckpt") or not parts[1].isdigit():
            raise SystemExit(f"bench_train: case {text!r} is not MODEL:IMAGE_SIZE[:ckpt]")
        if parts[0] not in (*RWKV_NAMES, *VIT_NAMES, "vit-tiny"):
            raise SystemExit(f"bench_train: unknown model {parts[0]!r} in case {text!r}")
        return cls(parts[0], int(parts[1]), len(parts) == 3)

    def __str__(self) -> str:
        return f"{self.model}:{self.image_size}" + (":ckpt" if self.checkpointing else "")


@dataclass
class Result:
    case: str
    batch: int
    status: str = "ok"
    images_per_s: float | None = None
    step_ms: float | None = None
    peak_memory_gib: float | None = None
    train_flops_per_image: float | None = None
    mfu: float | None = None
    bi_wkv_calls: dict | None = None
    profile: list = field(default_factory=list)


def vit_forward_flops(model) -> int:
    """Forward FLOPs per image-text pair of an open_clip CLIP with ViT towers (2 per multiply-add):
    patch embedding, per token and block 4 w^2 (q, k, v, out) + 2 w h (MLP) + 2 T w (scores and
    their product with v, the whole T x T square as the usual count), the two projections."""
    def tower_macs(transformer, tokens: int) -> int:
        width = transformer.width
        hidden = transformer.resblocks[0].mlp.c_fc.out_features
        return transformer.layers * tokens * (4 * width * width + 2 * width * hidden + 2 * tokens * width)

    visual = model.visual
    grid = visual.grid_size[0] * visual.grid_size[1]
    conv = visual.conv1.weight
    macs = grid * conv[0].numel() * conv.shape[0]
    macs += tower_macs(visual.transformer, grid + 1) + visual.proj.numel()
    macs += tower_macs(model.transformer, model.context_length) + model.text_projection.numel()
    return 2 * macs


def build(case: Case):
    """(model, forward FLOPs per pair, text context length, vocabulary size)."""
    if case.model in RWKV_NAMES:
        model = create_model(RWKV_NAMES[case.model], image={"image_size": case.image_size})
        model.set_activation_checkpointing(case.checkpointing)
        config = model.config
        return model, forward_flops_per_sample(config), config.text.context_length, config.text.vocab_size
    import open_clip

    if case.model == "vit-tiny":
        model = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": case.image_size, "patch_size": 4, "width": 64,
                                                         "layers": 2, "head_width": 32},
                               text_cfg={"context_length": 77, "width": 64, "heads": 2, "layers": 2})
    else:
        model = open_clip.create_model(VIT_NAMES[case.model], pretrained=None, force_image_size=case.image_size)
    model.set_grad_checkpointing(case.checkpointing)
    return model, vit_forward_flops(model), model.context_length, model.vocab_size


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            torch.cuda.synchronize()
            self.ms = self.start.elapsed_time(self.end)
        else:
            self.ms = (time.perf_counter() - self.t0) * 1e3


def run_case(case: Case, batch: int, steps: int, warmup: int, device: torch.device, peak: float | None,
             precision: str = "bf16", profile_top: int = 0) -> Result:
    result = Result(str(case), batch)
    torch.manual_seed(0)
    model, flops, context, vocab = build(case)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  **({"fused": True} if device.type == "cuda" else {}))
    loss_fn = ClipLoss(rank=0, world_size=1)
    images = torch.randn(batch, 3, case.image_size, case.image_size, device=device)
    tokens = torch.randint(1, min(vocab, 49407), (batch, context), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            image = model.encode_image(images, normalize=True)
            text = model.encode_text(tokens, normalize=True)
            loss = loss_fn(image, text, model.logit_scale.exp())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for _ in range(warmup):
            step()
        ops.reset_dispatch_counts()
        times = []
        for _ in range(steps):
            with Timer(device) as timer:
                loss = step()
            times.append(timer.ms)
        if not torch.isfinite(loss):
            raise RuntimeError(f"bench_train: {case}: the loss is not finite ({loss.item()})")
        if profile_top:
            result.profile = profile_step(step, device, profile_top)
    except torch.cuda.OutOfMemoryError:
        result.status = "OOM"
        return result
    finally:
        # Frees this case's GPU memory before the next one (the step closure shares these cells).
        model = optimizer = None
    result.step_ms = statistics.median(times)
    result.images_per_s = batch / (result.step_ms / 1e3)
    result.train_flops_per_image = flops * (4 if case.checkpointing else 3)
    if peak:
        result.mfu = result.train_flops_per_image * result.images_per_s / peak
    if device.type == "cuda":
        result.peak_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
    if case.model in RWKV_NAMES:
        result.bi_wkv_calls = ops.dispatch_counts()
    return result


def profile_step(step, device: torch.device, top: int) -> list[dict]:
    """The `top` kernels (CUDA) or operators (CPU) of one step by self time."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, attr), reverse=True)
    return [{"name": e.key, "self_ms": getattr(e, attr) / 1e3, "calls": e.count}
            for e in events[:top] if getattr(e, attr) > 0]


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def table(results: list[Result], title: str) -> str:
    def fmt(value, pattern):
        return "n/a" if value is None else pattern.format(value)

    lines = [title, "", "| case | batch | images/s | step ms | peak GiB | MFU | Bi-WKV calls (cuda/triton/chunked) |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        calls = "-" if r.bi_wkv_calls is None else "/".join(str(r.bi_wkv_calls[p]) for p in ops.IMPLEMENTATIONS)
        lines.append(f"| {r.case} | {r.batch} | {fmt(r.images_per_s, '{:.1f}')} | {fmt(r.step_ms, '{:.1f}')} | "
                     f"{fmt(r.peak_memory_gib, '{:.1f}')} | {fmt(r.mfu, '{:.1%}')} | {calls} |"
                     + ("" if r.status == "ok" else f" {r.status}"))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench_train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", help="MODEL:IMAGE_SIZE[:ckpt] (default: the issue's list)")
    parser.add_argument("--tiny", action="store_true", help="tiny models at 32 px (the CPU smoke test)")
    parser.add_argument("--batch", type=int, help="per-GPU batch for every case (default: by image size)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per case (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("bf16", "fp32"),
                        help="bf16 autocast (default on CUDA) or fp32 (default on CPU, where bf16 is emulated)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak for the MFU (default: by GPU name)")
    parser.add_argument("--profile", metavar="CASE", help="also write the top kernels of one step of CASE")
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--require-fused", action="store_true",
                        help="fail unless every RWKV case ran all its Bi-WKV calls on the fused kernel")
    parser.add_argument("--out", type=Path, help="JSON results file")
    return parser


def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        ops.prepare(device, torch.bfloat16, (16, 64, 80))
    cases = [Case.parse(c) for c in (args.cases or (TINY_CASES if args.tiny else DEFAULT_CASES))]
    peak = peak_flops(device, args.peak_tflops)
    results = []
    for case in cases:
        batch = args.batch or (8 if case.model.endswith("tiny") else DEFAULT_BATCH.get(case.image_size, 16))
        profile_top = args.profile_top if args.profile == str(case) else 0
        started = time.perf_counter()
        result = run_case(case, batch, args.steps, args.warmup, device, peak, precision, profile_top)
        results.append(result)
        print(f"{case}: {result.status}, {result.images_per_s or 0:.1f} images/s "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (f"Training step on {gpu}: {precision}, ClipLoss, AdamW; median of {args.steps} steps after "
             f"{args.warmup} warm-up; MFU against {'n/a' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}")
    print(table(results, title))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(strict_json({"device": gpu, "precision": precision, "peak_flops": peak, "steps": args.steps,
                                        "results": [asdict(r) for r in results]}, indent=2) + "\n")
        print(f"written to {args.out}")
    if args.require_fused:
        unfused = [r.case for r in results if r.bi_wkv_calls is not None
                   and (r.bi_wkv_calls["chunked"] or not r.bi_wkv_calls["cuda"])]
        if unfused:
            raise SystemExit(f"bench_train: the fused Bi-WKV kernel did not serve every call in {unfused}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_tool(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
