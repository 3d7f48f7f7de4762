"""The spike detector's rule. The rewind itself runs with real DeepSpeed ranks in tests/test_finetune.py,
which shares its trained source run (a fresh model's early losses sit near chance, where even a
1000x lr step only collapses the features to chance: no spike to detect)."""
from __future__ import annotations

from rwkvclip_dist.training.spike import SpikeDetector, SpikeSection

def test_detector_window_patience_and_nonfinite():
    detector = SpikeDetector(SpikeSection(enabled=True, factor=2.0, window=3, patience=2))
    assert not any(detector.observe(s, 3.0, True) for s in (1, 2, 3))
    assert not detector.observe(4, 7.0, True)  # one spiking step: patience 2
    assert detector.observe(5, float("nan"), False) and detector.first_spike_step() == 4
    fresh = SpikeDetector(SpikeSection(enabled=True, factor=2.0, window=3))
    assert not fresh.observe(1, 100.0, True)  # no detection before the window is known
    assert SpikeDetector(SpikeSection(inject_lr_scale_at_step=5)).lr_scale(5) == 1000.0
