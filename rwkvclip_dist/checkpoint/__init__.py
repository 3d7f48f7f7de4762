"""Checkpoint manager: DeepSpeed shards plus every rank's Stateful objects (train state with its
RNGs, data loader) and the run's record; atomic `latest`; keep-last-k."""
