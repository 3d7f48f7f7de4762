"""Linear probe: L2-regularised multinomial logistic regression on frozen image features.

The protocol of CLIP papers: hold out part of the training features as a validation split, sweep
the regularisation strength on it (a coarse log grid, then a finer grid around the best value),
refit on all training features with the chosen strength, and report test accuracy. The objective
is ``mean cross-entropy + lam/2 * ||W||^2`` (bias unpenalised); the ``sklearn`` backend solves the
same problem with ``C = 1 / (lam * n)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from rwkvclip_dist.eval.metrics import confusion_counts, summarise_counts


@dataclass
class LinearProbeConfig:
    backend: str = "torch"
    """'torch' (L-BFGS on the features' device, CPU or GPU) or 'sklearn' (lbfgs solver, CPU)."""
    val_fraction: float = 0.2
    """Share of the training features held out to pick the regularisation strength."""
    coarse_log10_lams: list[float] = field(default_factory=lambda: [float(x) for x in range(-6, 3)])
    """First sweep over log10(lam)."""
    refine_steps: int = 4
    """Extra points per side, spaced 1/refine_steps decades, around the best coarse value (0: none)."""
    max_iter: int = 500
    """L-BFGS iterations per fit."""
    seed: int = 0
    """Seed of the train/validation split."""


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, n_classes: int, lam: float, config: LinearProbeConfig):
    """Returns ``(weight [D, C], bias [C])`` as float32 tensors on the features' device."""
    if config.backend == "sklearn":
        from sklearn.linear_model import LogisticRegression

        clf = LogisticRegression(C=1.0 / (lam * len(labels)), max_iter=config.max_iter)
        clf.fit(features.cpu().double().numpy(), labels.cpu().numpy())
        weight = torch.zeros(features.shape[1], n_classes, dtype=torch.float64)
        bias = torch.zeros(n_classes, dtype=torch.float64)
        present = torch.as_tensor(clf.classes_)
        coef, intercept = torch.as_tensor(clf.coef_), torch.as_tensor(clf.intercept_)
        if len(present) == 2:  # sklearn stores one row for a binary problem
            coef, intercept = torch.cat([-coef / 2, coef / 2]), torch.cat([-intercept / 2, intercept / 2])
        # Classes missing from the fit get -inf bias so they are never predicted.
        bias.fill_(float("-inf"))
        weight[:, present], bias[present] = coef.t(), intercept
        return weight.float().to(features.device), bias.float().to(features.device)
    if config.backend != "torch":
        raise ValueError(f"linear probe backend must be 'torch' or 'sklearn', got {config.backend!r}")
    x, y = features.float(), labels.long()
    weight = torch.zeros(x.shape[1], n_classes, device=x.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=config.max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + 0.5 * lam * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


def _accuracy(features, labels, weight, bias) -> dict:
    return summarise_counts(confusion_counts(features.float() @ weight + bias, labels.long()), weight.shape[1])


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    config: LinearProbeConfig | None = None,
) -> dict:
    """Sweeps lam on a validation split of the training data, refits, and scores the test data.

    Returns the test metrics (top1, top5, mean_per_class, n), the chosen ``lam`` and the sweep as
    ``{log10(lam): validation top-1}``.
    """
    config = config or LinearProbeConfig()
    if not 0.0 < config.val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {config.val_fraction}")
    n_classes = int(max(train_labels.max(), test_labels.max())) + 1
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(train_labels), generator=generator).to(train_labels.device)
    n_val = max(1, int(round(config.val_fraction * len(order))))
    if n_val >= len(order):
        raise ValueError(f"linear probe needs at least 2 training samples, got {len(order)}")
    val_idx, fit_idx = order[:n_val], order[n_val:]

    sweep: dict[float, float] = {}

    def score(log_lam: float) -> float:
        log_lam = round(log_lam, 4)
        if log_lam not in sweep:
            w, b = fit_logistic(train_features[fit_idx], train_labels[fit_idx], n_classes, 10.0**log_lam, config)
            sweep[log_lam] = _accuracy(train_features[val_idx], train_labels[val_idx], w, b)["top1"]
        return sweep[log_lam]

    # Ties go to the stronger regularisation (the larger lam), which generalises more safely.
    best = max(config.coarse_log10_lams, key=lambda v: (score(v), v))
    step = 1.0 / config.refine_steps if config.refine_steps else 0.0
    fine = [best + step * i for i in range(-config.refine_steps, config.refine_steps + 1)]
    best = max(fine, key=lambda v: (score(v), v))
    weight, bias = fit_logistic(train_features, train_labels, n_classes, 10.0**best, config)
    result = _accuracy(test_features, test_labels, weight, bias)
    result.update(lam=10.0**best, sweep={f"{k:g}": v for k, v in sorted(sweep.items())})
    return result
