"""Evaluation: zero-shot classification, retrieval and linear probes on frozen features.

One path serves ``tools/evaluate.py`` and the in-loop evaluation of a training run:
:func:`open_labelled_images` -> :func:`image_features` (sharded over ranks, each image once) ->
:func:`zeroshot_scores`.
"""

from rwkvclip_dist.eval.classnames import class_names, load_class_prompts
from rwkvclip_dist.eval.datasets import open_labelled_images
from rwkvclip_dist.eval.features import LoaderConfig, image_features
from rwkvclip_dist.eval.zeroshot import build_zeroshot_classifier, zeroshot_from_features, zeroshot_scores

__all__ = ["LoaderConfig", "build_zeroshot_classifier", "class_names", "image_features", "load_class_prompts",
           "open_labelled_images", "zeroshot_from_features", "zeroshot_scores"]
