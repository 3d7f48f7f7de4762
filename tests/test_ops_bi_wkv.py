"""Bi-WKV (SPEC section 4): the exact chunked CPU path against a direct float64 evaluation."""
import pytest
import torch

from rwkvclip_dist.ops import bi_wkv
from rwkvclip_dist.ops.bi_wkv_chunked import bi_wkv_chunked
from rwkvclip_dist.ops.bi_wkv_reference import bi_wkv_float64, bi_wkv_scan
from wkv_inputs import random_inputs, relative_error


@pytest.mark.parametrize("tokens", [1, 2, 3, 7, 64, 65, 257])
@pytest.mark.parametrize("size", [8, 64, 80])
def test_chunked_matches_float64_formula(tokens, size):
    inputs = random_inputs(2, tokens, 2, size, seed=tokens * 1000 + size)
    assert relative_error(bi_wkv_chunked(*inputs), bi_wkv_float64(*inputs)) < 1e-12


@pytest.mark.parametrize("chunk", [1, 2, 5, 16, 32])
def test_chunk_size_does_not_change_the_result(chunk):
    inputs = random_inputs(1, 37, 3, 8, seed=chunk)
    assert relative_error(bi_wkv_chunked(*inputs, chunk=chunk), bi_wkv_float64(*inputs)) < 1e-12


def test_fp32_path_is_accurate_with_strong_decays():
    inputs = random_inputs(2, 197, 2, 64, dtype=torch.float32, seed=3)
    r, k, v, w, u = inputs
    w[:, ::7] = 5.0  # many near-zero decays, the regime where exp(+cumsum) formulations overflow
    out = bi_wkv(r, k, v, w, u)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert relative_error(out, bi_wkv_float64(r, k, v, w, u)) < 1e-5


def test_long_sequence_is_stable_and_exact():
    """T = 4096 with weak and strong decays: fp32 chunked path against the fp32 per-token scan."""
    r, k, v, w, u = random_inputs(1, 4096, 1, 16, dtype=torch.float32, seed=4)
    w[..., :8] = -8.0  # half the channels barely decay: information crosses the whole sequence
    out = bi_wkv_chunked(r, k, v, w, u)
    assert torch.isfinite(out).all()
    reference = bi_wkv_chunked(*(x.double() for x in (r, k, v, w, u)))
    assert relative_error(out, reference) < 1e-4
    assert relative_error(bi_wkv_scan(r, k, v, w, u), reference) < 1e-4


def test_scan_baseline_matches_formula():
    inputs = random_inputs(2, 19, 2, 8, seed=5)
    assert relative_error(bi_wkv_scan(*inputs), bi_wkv_float64(*inputs)) < 1e-6


def test_gradcheck_all_five_inputs():
    r, k, v, w, u = (x.requires_grad_() for x in random_inputs(1, 6, 2, 4, decay_scale=0.3, seed=6))
    assert torch.autograd.gradcheck(lambda *a: bi_wkv_chunked(*a, chunk=4), (r, k, v, w, u), atol=1e-7, rtol=1e-5)


def test_gradients_match_the_scan_recurrence():
    """Autograd through two different algorithms must agree: a gradient bug shows up as a mismatch."""
    base = random_inputs(2, 33, 2, 8, seed=7)
    grads = []
    for fn in (bi_wkv_chunked, bi_wkv_scan):
        inputs = [x.clone().requires_grad_() for x in base]
        weight = torch.linspace(-1, 1, 33 * 2 * 2 * 8, dtype=torch.float64).view(2, 33, 2, 8)
        (fn(*inputs).double() * weight).sum().backward()
        grads.append([x.grad for x in inputs])
    for name, a, b in zip("rkvwu", *grads):
        assert relative_error(a, b) < 1e-5, name


def test_output_dtype_follows_input():
    inputs = random_inputs(1, 9, 1, 8, dtype=torch.bfloat16)
    assert bi_wkv(*inputs).dtype == torch.bfloat16


def test_bad_shapes_are_named():
    r, k, v, w, u = random_inputs(1, 4, 2, 8)
    with pytest.raises(ValueError, match="k has shape"):
        bi_wkv(r, k[:, :3], v, w, u)
    with pytest.raises(ValueError, match="u has shape"):
        bi_wkv(r, k, v, w, u[:1])
    with pytest.raises(ValueError, match=r"\[B, T, H, N\]"):
        bi_wkv(r[0], k[0], v[0], w[0], u)
