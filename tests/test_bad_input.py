"""Malformed, truncated, wrong-type and hostile inputs: a clear error naming the file, field or line,
no code run, nothing written. (Checkpoints: tests/test_checkpoint_faults.py; the tools' command-line
errors: their own tests.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import PYTHON, REPO, TRAIN, dist_env
from rwkvclip_dist.data.index_check import ShardIndexError, check_local_index


@pytest.fixture
def stream(tmp_path, demo_data):
    copy = tmp_path / "stream"
    shutil.copytree(demo_data / "train", copy)
    return copy


def _edit_index(stream, edit) -> None:
    index = json.loads((stream / "index.json").read_text())
    edit(index)
    (stream / "index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("case, expected", [
    ("truncated_json", r"index\.json: not valid JSON"),
    ("shards_not_a_list", r"index\.json: 'shards' must be a list, got 'x'"),
    ("bytes_not_int", r"index\.json: shards\[0\]\.raw_data\.bytes must be an integer, got '12'"),
    ("traversal", r"index\.json: shards\[0\]\.raw_data\.basename '\.\./\.\./etc/passwd' points outside"),
    ("absolute", r"shards\[0\]\.zip_data\.basename '/tmp/x\.zstd' points outside"),
    ("truncated_shard", r"shard\.00000\.mds\.zstd: 1000 bytes, but .*index\.json says \d+ \(truncated"),
    ("missing_shard", r"shards\[0\] lists .*shard\.00000\.mds, .*which does not exist"),
])
def test_shard_index_problems_name_the_file_and_field(stream, case, expected):
    index = stream / "index.json"
    if case == "truncated_json":
        index.write_text(index.read_text()[:100])
    elif case == "shards_not_a_list":
        _edit_index(stream, lambda d: d.update(shards="x"))
    elif case == "bytes_not_int":
        _edit_index(stream, lambda d: d["shards"][0]["raw_data"].update(bytes="12"))
    elif case == "traversal":
        _edit_index(stream, lambda d: d["shards"][0]["raw_data"].update(basename="../../etc/passwd"))
    elif case == "absolute":
        _edit_index(stream, lambda d: d["shards"][0]["zip_data"].update(basename="/tmp/x.zstd"))
    elif case == "truncated_shard":
        os.truncate(stream / "shard.00000.mds.zstd", 1000)
    else:
        for shard in stream.glob("shard.00000.*"):
            shard.unlink()
    with pytest.raises(ShardIndexError, match=expected):
        check_local_index(stream)


def test_the_train_loader_checks_the_index_before_streaming_reads_it(stream):
    from rwkvclip_dist.data.config import DataConfig, StreamConfig
    from rwkvclip_dist.data.loader import build_train_dataloader

    os.truncate(stream / "shard.00000.mds.zstd", 1000)  # a half-copied shard
    with pytest.raises(ShardIndexError, match=r"shard\.00000\.mds\.zstd: 1000 bytes"):
        build_train_dataloader(DataConfig(streams=[StreamConfig(remote=str(stream))], batch_size=4), 32, 0)


@pytest.mark.parametrize("line, expected", [
    ('{"key": "c0", "synthetic": 5}', r"caps\.jsonl:2: key 'c0': 'synthetic' must be a string, got 5"),
    ('{"key": "c0", "tags": "cat"}', r"caps\.jsonl:2: key 'c0': 'tags' must be a list of strings, got 'cat'"),
    ('{"key": 7, "generated": "x"}', r"caps\.jsonl:2: each line needs a string 'key'"),
    ('{"key": "c1", "synth', r"caps\.jsonl:2: not a JSON line"),
])
def test_caption_jsonl_problems_name_the_line(tmp_path, line, expected):
    """Through the on-disk caption join that make_shards --captions uses; no index is left behind."""
    from rwkvclip_dist.data.shards.captions import index_captions

    captions, db = tmp_path / "caps.jsonl", tmp_path / "captions.sqlite"
    captions.write_text('{"key": "ok", "synthetic": "fine"}\n' + line)
    with pytest.raises(ValueError, match=expected):
        index_captions([str(captions)], str(db))
    assert not db.exists()


@pytest.mark.parametrize("keep", ["half", "20 bytes"])
def test_a_truncated_converted_model_names_the_file(tmp_path, keep):
    from rwkvclip_dist import create_model
    from rwkvclip_dist.pretrained import load_model, save_pretrained

    path = save_pretrained(create_model("tiny"), tmp_path / "tiny.safetensors")
    os.truncate(path, path.stat().st_size // 2 if keep == "half" else 20)
    with pytest.raises(ValueError, match=rf"{path}: not a readable \.safetensors file \(truncated or corrupt"):
        load_model(None, path)


def test_a_hostile_recipe_runs_no_code_and_writes_nothing(tmp_path):
    """A YAML tag that would call os.system when loaded unsafely; a run directory that exists."""
    marker = tmp_path / "code_ran"
    recipe = tmp_path / "evil.yaml"
    recipe.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("the previous run's recipe\n")
    proc = subprocess.run([PYTHON, TRAIN, "--recipe", str(recipe), "--run-dir", str(run)], cwd=REPO,
                          env=dist_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"recipe {recipe}: invalid YAML" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists() and (run / "recipe.yaml").read_text() == "the previous run's recipe\n"
