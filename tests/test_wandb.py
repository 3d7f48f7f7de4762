"""``logging.wandb`` in wandb's offline mode (no network): on 2 gloo ranks under ZeRO-2, rank 0's run
files under RUN_DIR/wandb hold the logged metrics and the recipe, and a resumed run continues the same
wandb run (the id is kept in the checkpoint). wandb is the real package, writing its own files. The
run (stopped after step 2, resumed to 4) is shared with tests/test_ema.py and tests/test_ema_eval.py
(tests/shared_runs.py)."""
from __future__ import annotations

import sys

import pytest

from conftest import DEMO_RECIPE
from shared_runs import ZERO2_GROUP, ZERO2_STEPS


def _records(run_file) -> list:
    """The protobuf records of a ``run-ID.wandb`` file: wandb's LevelDB-log framing (a 7-byte file
    header, 32 KiB blocks of records with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST),
    read here because wandb 0.31 no longer ships a Python reader of it."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", run_file
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one record complete
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _offline_runs(run) -> dict:
    """``{run id: [records]}`` of every offline wandb run of ``run``'s directory (one per launch)."""
    runs: dict = {}
    for path in sorted((run / "wandb").glob("offline-run-*/run-*.wandb")):
        runs.setdefault(path.stem.removeprefix("run-"), []).append(_records(path))
    return runs


@pytest.mark.slow
@pytest.mark.xdist_group(ZERO2_GROUP)
def test_offline_run_files_hold_the_metrics_and_recipe_and_a_resume_continues_the_same_run(ema_zero2_run):
    import json

    wandb_run = ema_zero2_run
    runs = _offline_runs(wandb_run)
    assert len(runs) == 1, f"a resumed run must continue the same wandb run, got ids {sorted(runs)}"
    (launches,) = runs.values()
    assert len(launches) == 2  # the first launch and the resumed one, each its own offline folder
    logged = {}
    for records in launches:
        for record in records:
            if record.WhichOneof("record_type") == "history":
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                logged[row["_step"]] = row
    losses = {json.loads(line)["step"]: json.loads(line)["loss"]
              for line in (wandb_run / "loss_log.jsonl").read_text().splitlines()}
    assert sorted(logged) == list(range(1, ZERO2_STEPS + 1))
    for step, loss in losses.items():  # logging.every_steps=1: each step's window is the step itself
        assert logged[step]["train/loss"] == pytest.approx(loss, rel=1e-6)
    config = {}
    for record in launches[0]:
        kind = record.WhichOneof("record_type")
        items = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in items})
    assert config["model"]["name"] == "tiny" and config["logging"]["wandb"]["mode"] == "offline"


def test_wandb_without_the_package_is_refused_at_load(monkeypatch):
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.typed_config import ConfigError

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails as when not installed
    with pytest.raises(ConfigError, match=r"logging\.wandb.*pip install 'rwkvclip_dist\[wandb\]'"):
        load_recipe(DEMO_RECIPE, ["logging.wandb={project: p}"], check_paths=False)
    load_recipe(DEMO_RECIPE, [], check_paths=False)  # off by default: wandb never imported


def test_wandb_mode_is_checked():
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.typed_config import ConfigError

    with pytest.raises(ConfigError, match="mode"):
        load_recipe(DEMO_RECIPE, ["logging.wandb={project: p, mode: sometimes}"], check_paths=False)
