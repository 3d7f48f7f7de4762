"""RWKV-CLIP in plain PyTorch: configs, towers, the CLIP wrapper. Knows nothing of DeepSpeed or torch.distributed."""
from rwkvclip_dist.model.clip import RWKVCLIP
from rwkvclip_dist.model.config import ConfigError, ImageTowerConfig, ModelConfig, TextTowerConfig
from rwkvclip_dist.model.registry import create_model, get_model_config, list_models

__all__ = ["RWKVCLIP", "ConfigError", "ImageTowerConfig", "ModelConfig", "TextTowerConfig",
           "create_model", "get_model_config", "list_models"]
