"""Data side: MDS shard contract and builder, three-text streaming loader, tokenizer, transforms."""

from rwkvclip_dist.data.config import DataConfig, StreamConfig
from rwkvclip_dist.data.tokenizer import tokenize
from rwkvclip_dist.data.transforms import eval_transform, train_transform

__all__ = ["DataConfig", "StreamConfig", "tokenize", "train_transform", "eval_transform"]
