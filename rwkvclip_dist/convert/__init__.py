"""Checkpoint conversion: the authors' released layout, DeepSpeed ZeRO directories, safetensors I/O."""
