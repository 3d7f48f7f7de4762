"""tools/export_hub.py and ``create_model_and_transforms("hf-hub:ORG/NAME")``: the exported folder is
put into a Hugging Face cache in huggingface_hub's own layout (blobs, snapshots, refs), and a fresh
process with ``HF_HUB_OFFLINE=1`` loads it through ``hf_hub_download`` (the real code path; there is
no network here, so ``--push`` is not tested)."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import torch

from conftest import REPO, dist_env
from rwkvclip_dist import create_model
from tool_loader import tool_main

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LOAD = """
import sys, torch
from rwkvclip_dist.pretrained import create_model_and_transforms, get_tokenizer
model, _, preprocess = create_model_and_transforms("hf-hub:someorg/rwkvclip-tiny")
tokens = get_tokenizer("hf-hub:someorg/rwkvclip-tiny")(["a photo of a seven"])
torch.save({"text": model.encode_text(tokens).detach(), "size": model.config.image.image_size}, sys.argv[1])
"""


def _populate_cache(folder, cache, repo_id: str) -> None:
    """What huggingface_hub writes when it downloads ``repo_id`` at COMMIT."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(COMMIT)
    for path in folder.iterdir():
        data = path.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / COMMIT / path.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f"../../blobs/{blob.name}")


def test_exported_folder_loads_offline_through_huggingface_hub(tmp_path):
    from rwkvclip_dist.data.tokenizer import tokenize
    from rwkvclip_dist.pretrained import save_pretrained

    model = create_model("tiny", **{"text.pool": "masked_mean"}).eval()
    source = save_pretrained(model, tmp_path / "tiny.safetensors")
    out = tmp_path / "hub" / "rwkvclip-tiny"
    assert tool_main("export_hub")([str(source), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "rwkvclip.json", "rwkvclip.safetensors",
                                                     "tokenizer_config.json"]
    assert "## Architecture" in (out / "README.md").read_text()
    assert tool_main("export_hub")([str(source), str(out)]) == 2  # never over an existing folder

    cache = tmp_path / "hf_cache"
    _populate_cache(out, cache, "someorg/rwkvclip-tiny")
    result = tmp_path / "loaded.pt"
    env = dist_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"))
    proc = subprocess.run([sys.executable, "-c", LOAD, str(result)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = torch.load(result, weights_only=True)
    with torch.no_grad():
        expected = model.encode_text(tokenize(["a photo of a seven"], context_length=model.config.text.context_length))
    assert loaded["size"] == 32 and torch.equal(loaded["text"], expected)

    missing = subprocess.run([sys.executable, "-c", LOAD.replace("someorg", "otherorg"), str(result)], cwd=REPO,
                             env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode != 0 and "no RWKV-CLIP weights" in missing.stderr
