"""Hugging Face Hub model repositories: the folder ``tools/export_hub.py`` writes, and loading one by
name (``create_model_and_transforms("hf-hub:ORG/NAME")``).

A repository holds ``rwkvclip.safetensors`` with its JSON record ``rwkvclip.json`` (our pretrained
format, ``pretrained_format.py``), ``tokenizer_config.json`` (which tokenizer and context length), and a
``README.md`` model card. Loading goes through ``huggingface_hub.hf_hub_download``, so its cache,
revisions, tokens and ``HF_HUB_OFFLINE=1`` behave as for any other model.
"""
from __future__ import annotations

from pathlib import Path

HUB_PREFIX = "hf-hub:"
WEIGHTS_FILE = "rwkvclip.safetensors"
RECORD_FILE = "rwkvclip.json"
TOKENIZER_FILE = "tokenizer_config.json"


def is_hub_name(name: object) -> bool:
    return isinstance(name, str) and name.startswith(HUB_PREFIX)


def download(name: str, revision: str | None = None) -> Path:
    """The local path of the weights of ``hf-hub:ORG/NAME[@REVISION]`` (downloaded or from the cache)."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as err:
        raise ImportError(f"{name}: loading from the Hugging Face Hub needs huggingface_hub "
                          f"(pip install huggingface_hub): {err}") from None
    repo_id = name[len(HUB_PREFIX):]
    if "@" in repo_id:
        repo_id, revision = repo_id.split("@", 1)
    if repo_id.count("/") != 1:
        raise ValueError(f"{name}: expected hf-hub:ORG/NAME")
    try:
        weights = hf_hub_download(repo_id, WEIGHTS_FILE, revision=revision)
        hf_hub_download(repo_id, RECORD_FILE, revision=revision)  # beside the weights in the snapshot
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FileNotFoundError(f"{name}: no RWKV-CLIP weights ({WEIGHTS_FILE}) found: {first}") from None
    return Path(weights)
