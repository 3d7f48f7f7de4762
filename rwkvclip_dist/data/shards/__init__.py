"""Shard building: raw image-text sources -> the MDS contract of ``data/columns.py`` (tools/make_shards.py,
tools/make_demo_data.py). The trainer's reader (``rwkvclip_dist.data``) never imports this package."""
