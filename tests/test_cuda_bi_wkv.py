"""The fused CUDA Bi-WKV kernels against exact references, on a GPU (skipped without one).

Forward: the direct float64 formula (``bi_wkv_float64``, on CPU) up to T=1025; at T=4096 its
O(T^2) tensors would need tens of GiB, so the exact chunked path in float64 stands in (it is
itself checked against the formula in tests/test_ops_bi_wkv.py). Gradients: autograd through the
chunked path in float64 (``bi_wkv_float64`` detaches its inputs). bf16 cases compare against the
references evaluated on the same bf16-rounded inputs. Tolerances are SPEC section 4's, norm-wise.
Freed memory is filled with NaN before every kernel call, so a scratch buffer element that a
kernel reads without writing shows up as NaN. The outputs themselves must start at zero (both
directions add onto them), so an element a kernel forgets to write would stay 0 and barely move a
norm-wise error: every comparison is also made element by element (``_assert_every_element``).
"""
from __future__ import annotations

import os

import pytest
import torch

from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked
from rwkvclip_dist.ops.bi_wkv_reference import bi_wkv_float64

# tools/gpu_check.sh sets RWKVCLIP_REQUIRE_GPU=1: there a missing GPU fails these tests instead of skipping them
pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("RWKVCLIP_REQUIRE_GPU") != "1",
                                reason="needs a CUDA GPU: the kernels cannot run on CPU")

TOKENS = [1, 2, 49, 64, 65, 196, 197, 256, 257, 577, 1025, 4096]
TOKENS_OTHER_SIZES = [1, 17, 65, 197, 1025]  # N = 16 and 128: the chunk edges and a long sequence
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-3}
# element-wise: |got - want| <= ELEMENT_RTOL * |want| + ELEMENT_ATOL * rms(want); an unwritten
# element (0 where the reference is of typical size) breaks the second term. The emulated kernel
# (T=197, N=64) needs at most 1.2e-3 (bf16) and 2.4e-6 (fp32) of ELEMENT_ATOL.
ELEMENT_RTOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}
ELEMENT_ATOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture(scope="module")
def kernel():
    from rwkvclip_dist.ops import bi_wkv_cuda

    assert bi_wkv_cuda.is_available(), f"a GPU is here but the kernel is not: {bi_wkv_cuda.unavailable_reason()}"
    return bi_wkv_cuda.bi_wkv_cuda


def _poison_free_memory(nbytes: int) -> None:
    junk = torch.full((nbytes // 4 + 1024,), float("nan"), device="cuda")
    del junk  # the caching allocator hands these NaN-filled blocks to the next allocations


def _inputs(batch, tokens, heads, size, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    shape = (batch, tokens, heads, size)
    r, k, v, dy = (torch.randn(shape, generator=g, device="cuda") for _ in range(4))
    # raw decays: from no decay (w=-6) to strong (w=3, per-step decay e^-20), a few past the clamp
    w = torch.rand(shape, generator=g, device="cuda") * 9 - 6
    w = torch.where(torch.rand(shape, generator=g, device="cuda") < 0.02, torch.full_like(w, 4.5), w)
    u = torch.randn(heads, size, generator=g, device="cuda")
    return [x.to(dtype) for x in (r, k, v, w, dy)] + [u]


def _rel(got, want):
    want = want.double().cpu()
    return ((got.double().cpu() - want).norm() / want.norm().clamp_min(1e-30)).item()


def _assert_every_element(got, want, dtype, name):
    got, want = got.double().cpu(), want.double().cpu()
    scale = want.pow(2).mean().sqrt().clamp_min(1e-30)
    bad = (got - want).abs() > ELEMENT_RTOL[dtype] * want.abs() + ELEMENT_ATOL[dtype] * scale
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} elements off, first at "
                           f"{tuple(int(i) for i in bad.nonzero()[0])}")


def _reference(r, k, v, w, u, dy):
    leaves = [x.detach().double().requires_grad_() for x in (r, k, v, w, u)]
    y = bi_wkv_chunked(*leaves)
    grads = torch.autograd.grad(y, leaves, dy.double())
    if r.shape[1] <= 1025:
        y = bi_wkv_float64(*(x.cpu() for x in (r, k, v, w, u)))
    return y.detach(), grads


def _check_against_reference(kernel, batch, tokens, heads, size, dtype, seed, inputs=None, on_gpu_reference=False):
    r, k, v, w, dy, u = inputs or _inputs(batch, tokens, heads, size, dtype, seed)
    if on_gpu_reference:  # the chunked path in float64 on the GPU: for sizes the CPU formula cannot take
        leaves64 = [x.detach().double().requires_grad_() for x in (r, k, v, w, u)]
        want_y = bi_wkv_chunked(*leaves64)
        want_grads = torch.autograd.grad(want_y, leaves64, dy.double())
    else:
        want_y, want_grads = _reference(r, k, v, w, u, dy)
    leaves = [x.detach().clone().requires_grad_() for x in (r, k, v, w, u)]
    _poison_free_memory(16 * r.numel() * 4 + (tokens // 16 + 1) * size * size * 8 * batch * heads)
    y = kernel(*leaves)
    assert y.dtype == dtype and y.shape == r.shape
    _poison_free_memory(16 * r.numel() * 4 + (tokens // 16 + 1) * size * size * 8 * batch * heads)
    y.backward(dy)
    tol = TOLERANCE[dtype]
    assert _rel(y, want_y) <= tol, f"y: {_rel(y, want_y):.2e}"
    _assert_every_element(y, want_y, dtype, "y")
    for name, leaf, want in zip("rkvwu", leaves, want_grads):
        assert leaf.grad.dtype == leaf.dtype
        err = _rel(leaf.grad, want)
        assert err <= tol, f"d{name}: {err:.2e} > {tol:.0e} (T={tokens}, N={size}, {dtype})"
        _assert_every_element(leaf.grad, want, dtype, f"d{name}")


def _small_batch(tokens):
    # the float64 formula on CPU holds B*H*T*T*N values per intermediate: keep it to a few GiB
    return (1, 1) if tokens > 1025 else (1, 2) if tokens > 300 else (2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", [64, 80])
@pytest.mark.parametrize("tokens", TOKENS)
def test_matches_reference(kernel, tokens, size, dtype):
    batch, heads = _small_batch(tokens)
    _check_against_reference(kernel, batch, tokens, heads, size, dtype, seed=tokens * 1000 + size)


@pytest.mark.parametrize("tokens, dtype", [(65, torch.bfloat16), (197, torch.float32)], ids=["65-bf16", "197-fp32"])
def test_v1_kernel_matches_reference(kernel, monkeypatch, tokens, dtype):
    """The v1 kernels (one block per direction), which stay built beside v2 for the benchmark."""
    monkeypatch.setenv("RWKVCLIP_BI_WKV_KERNEL", "v1")
    batch, heads = _small_batch(tokens)
    _check_against_reference(kernel, batch, tokens, heads, 64, dtype, seed=tokens * 1000 + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("size", [16, 128])
@pytest.mark.parametrize("tokens", TOKENS_OTHER_SIZES)
def test_other_head_sizes_match_reference(kernel, tokens, size, dtype):
    """N=16 (one tile per row) and N=128 (160 KiB of shared memory, the most any GPU here allows)."""
    batch, heads = _small_batch(tokens)
    _check_against_reference(kernel, batch, tokens, heads, size, dtype, seed=tokens * 1000 + size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_grid_that_fills_the_chip(kernel, dtype):
    """Four (batch, head) pairs per multiprocessor, both directions: several blocks per SM at
    once, which the small cases above never reach."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    heads = 12
    batch = -(-4 * sms // heads)
    _check_against_reference(kernel, batch, 197, heads, 64, dtype, seed=99, on_gpu_reference=True)


@pytest.mark.parametrize("size", [64, 80])
def test_slow_decays_over_long_sequences_in_fp32(kernel, size):
    """Per-step decays ~0.99988 over 4096 tokens: the state crosses 256 chunk boundaries, where the
    tensor cores' truncating sums would compound if the state were accumulated on them
    (docs/cuda.md); the fp32 target holds."""
    r, k, v, _, dy, u = _inputs(1, 4096, 2, size, torch.float32, seed=7)
    g = torch.Generator(device="cuda").manual_seed(8)
    w = -9.0 + 0.1 * torch.randn(r.shape, generator=g, device="cuda")
    _check_against_reference(kernel, 1, 4096, 2, size, torch.float32, seed=0, inputs=(r, k, v, w, dy, u),
                             on_gpu_reference=True)


def test_empty_batch_and_misaligned_inputs(kernel):
    """B = 0 launches nothing (a zero-block grid is a launch error); inputs whose data start off a
    16-byte boundary are copied before the 16-byte vector loads and give the same result."""
    r, k, v, w, dy, u = _inputs(0, 33, 2, 64, torch.bfloat16, seed=1)
    leaves = [x.detach().clone().requires_grad_() for x in (r, k, v, w, u)]
    kernel(*leaves).backward(dy)
    torch.cuda.synchronize()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in leaves)
    r, k, v, w, dy, u = _inputs(1, 33, 2, 64, torch.bfloat16, seed=1)
    shifted = []
    for x in (r, k, v, w):
        storage = torch.empty(x.numel() + 1, dtype=x.dtype, device="cuda")
        shifted.append(storage[1:].view(x.shape).copy_(x))
        assert shifted[-1].data_ptr() % 16 != 0
    assert torch.equal(kernel(*shifted, u), kernel(r, k, v, w, u))


def test_dispatch_under_autocast_and_compile_in_a_fresh_process():
    """In a new process, without ops.prepare(): torch.compile(fullgraph=True) of a model block under
    bf16 autocast (w arrives in fp32 beside bf16 r, k, v) runs on the fused kernel."""
    import subprocess
    import sys

    code = (
        "import torch\n"
        "from rwkvclip_dist import ops\n"
        "from rwkvclip_dist.model.mixing import TimeMix\n"
        "from rwkvclip_dist.model.shift import b_shift\n"
        "block = TimeMix(128, 64, 1e-5).cuda()\n"
        "x = torch.randn(2, 196, 128, device='cuda', requires_grad=True)\n"
        "step = torch.compile(lambda x: block(x, lambda t: b_shift(t, 64)).float().square().mean(), fullgraph=True, backend='aot_eager')\n"
        "with torch.autocast('cuda', dtype=torch.bfloat16):\n"
        "    step(x).backward()\n"
        "torch.cuda.synchronize()\n"
        "assert ops.dispatch_counts()['cuda'] >= 1 and ops.dispatch_counts()['chunked'] == 0, ops.dispatch_counts()\n"
        "assert torch.isfinite(x.grad).all()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_bitwise_deterministic(kernel):
    r, k, v, w, dy, u = _inputs(2, 300, 3, 64, torch.bfloat16, seed=1)
    runs = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in (r, k, v, w, u)]
        y = kernel(*leaves)
        y.backward(dy)
        runs.append([y] + [x.grad for x in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_fp16_inputs(kernel):
    r, k, v, w, dy, u = _inputs(2, 130, 2, 64, torch.float16, seed=2)
    want_y, want_grads = _reference(r, k, v, w, u, dy)
    leaves = [x.detach().clone().requires_grad_() for x in (r, k, v, w, u)]
    y = kernel(*leaves)
    y.backward(dy)
    assert _rel(y, want_y) <= 5e-3
    assert all(_rel(x.grad, g) <= 5e-3 for x, g in zip(leaves, want_grads))


def test_compile_and_checkpoint_through_the_op(kernel):
    from torch.utils.checkpoint import checkpoint

    r, k, v, w, dy, u = _inputs(2, 197, 2, 64, torch.float32, seed=3)

    def block(r, k, v, w, u):
        return checkpoint(lambda *a: kernel(*a).tanh(), r, k, v, w, u, use_reentrant=False)

    results = []
    for fn in (block, torch.compile(block, fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_() for x in (r, k, v, w, u)]
        y = fn(*leaves)
        y.backward(dy)
        results.append([y] + [x.grad for x in leaves])
    for name, a, b in zip(["y", "dr", "dk", "dv", "dw", "du"], *results):
        assert _rel(a, b) <= 1e-6, name


def test_whole_model_matches_the_reference_path(kernel, monkeypatch):
    """The tiny model on CUDA (kernel) against the same model on CPU (chunked reference path)."""
    import rwkvclip_dist

    # TF32 convolutions/matmuls on the GPU would differ from CPU by ~1e-3 for reasons unrelated to Bi-WKV
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = rwkvclip_dist.create_model("tiny")
    images = torch.randn(4, 3, 32, 32)
    tokens = torch.randint(1, 1000, (4, 77))
    outputs = {}
    for device in ("cpu", "cuda"):
        m = model.to(device)
        m.zero_grad()
        out = m(images.to(device), tokens.to(device))
        loss = (out["image_features"] @ out["text_features"].T).sum() * out["logit_scale"]
        loss.backward()
        outputs[device] = [out["image_features"], out["text_features"]] + [
            p.grad.detach().clone() for p in m.parameters() if p.grad is not None]
    assert len(outputs["cpu"]) == len(outputs["cuda"])
    for i, (a, b) in enumerate(zip(outputs["cuda"], outputs["cpu"])):
        assert _rel(a, b) <= 1e-4, f"tensor {i}: {_rel(a, b):.2e}"
