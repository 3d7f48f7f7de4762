"""Checkpoint manager: DeepSpeed shards plus loader, RNG and counter state; atomic `latest`; keep-last-k."""
