"""Evaluation: zero-shot classification, retrieval and linear probes on frozen features."""

from rwkvclip_dist.eval.zeroshot import build_zeroshot_classifier, evaluate_zeroshot

__all__ = ["build_zeroshot_classifier", "evaluate_zeroshot"]
