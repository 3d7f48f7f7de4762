"""Random Bi-WKV inputs and the relative error the Bi-WKV tests measure (shared by test_ops_bi_wkv.py
and test_ops_triton.py)."""
import torch


def random_inputs(batch, tokens, heads, size, dtype=torch.float64, decay_scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r, k, v = (torch.randn(batch, tokens, heads, size, generator=gen, dtype=dtype) for _ in range(3))
    # Raw decays spread over [-5, 5] * scale: exp(-exp(5)) ~ 1e-64 is a very strong decay.
    w = (torch.rand(batch, tokens, heads, size, generator=gen, dtype=dtype) * 10 - 5) * decay_scale
    u = torch.randn(heads, size, generator=gen, dtype=dtype)
    return r, k, v, w, u


def relative_error(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
