"""Checkpoint conversion: the authors' released layout and DeepSpeed ZeRO directories to and from our
pretrained file format (``rwkvclip_dist.pretrained_format``)."""
