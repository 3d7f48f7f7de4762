"""Checkpoints kept in an object store (checkpoint/remote.py) against a real S3 API server on
127.0.0.1 (moto_server, rwkvclip_dist/data/local_s3.py): upload order, incomplete remote copies passed
over with their reason, remote pruning, a run whose only checkpoint is a remote copy of another
tensor-parallel size or model refused before any engine, and a trainer SIGKILLed during an upload
whose wiped run directory resumes from the newest complete remote copy with the uninterrupted run's
losses."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time

import sys

import pytest
import torch

from conftest import DEMO_RECIPE, REFERENCE_STEPS, REPO, dist_env, launch_cmd, loss_log, rank_processes, run_checked, torchrun_cmd, train_args
from rwkvclip_dist.checkpoint.integrity import MANIFEST_FILE, list_files, write_manifest
from rwkvclip_dist.checkpoint.manager import CLIENT_FILE, _atomic_write_text
from rwkvclip_dist.checkpoint.record import RunRecord
from rwkvclip_dist.checkpoint.remote import RemoteCheckpoints, Uploader
from rwkvclip_dist.data.local_s3 import LocalS3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with LocalS3Server(tmp_path_factory.mktemp("s3") / "server.log") as server:
        server.client().create_bucket(Bucket="ckpt")
        yield server


@pytest.fixture
def remote(s3, monkeypatch, request):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    return RemoteCheckpoints(f"s3://ckpt/{request.node.name}", CLIENT_FILE)


def _local_checkpoint(directory, step: int, payload: bytes = b"x" * 1000):
    """A complete checkpoint as the manager writes one: files, manifest, marker."""
    tag_dir = directory / f"step_{step:08d}"
    (tag_dir / "zero").mkdir(parents=True)
    (tag_dir / "rank_00000.pt").write_bytes(payload)
    (tag_dir / "zero" / "shard.pt").write_bytes(payload * 3)
    write_manifest(tag_dir, list_files(tag_dir, CLIENT_FILE), _atomic_write_text)
    (tag_dir / CLIENT_FILE).write_bytes(b"record")
    return tag_dir


def test_upload_restore_and_prune_keep_only_complete_copies(remote, tmp_path, caplog):
    local = tmp_path / "local"
    for step in (2, 4, 6):
        remote.upload(_local_checkpoint(local, step))
    assert remote.tags() == ["step_00000002", "step_00000004", "step_00000006"]
    assert all(remote.problem(tag) is None for tag in remote.tags())
    client = remote._client()
    assert client.get_object(Bucket="ckpt", Key=f"{remote.prefix}/latest")["Body"].read() == b"step_00000006\n"

    # An upload cut off before its marker, and a copy whose object is shorter than its manifest says.
    client.delete_object(Bucket="ckpt", Key=f"{remote.prefix}/step_00000006/{CLIENT_FILE}")
    client.put_object(Bucket="ckpt", Key=f"{remote.prefix}/step_00000004/zero/shard.pt", Body=b"short")
    assert "no completion marker" in remote.problem("step_00000006")
    assert "zero/shard.pt has 5 bytes, the manifest says 3000" in remote.problem("step_00000004")

    wiped = tmp_path / "wiped"
    with caplog.at_level(logging.WARNING, logger="rwkvclip_dist.checkpoint.remote"):
        assert remote.restore(wiped, _atomic_write_text) == "step_00000002"
    assert "step_00000006 is not used: it has no completion marker" in caplog.text
    assert "step_00000004 is not used: zero/shard.pt has 5 bytes" in caplog.text
    assert (wiped / "latest").read_text() == "step_00000002\n"
    assert (wiped / "step_00000002" / "zero" / "shard.pt").read_bytes() == b"x" * 3000
    assert not list(wiped.glob("*.download"))

    # Pruning counts complete copies only: with keep_last=1 the one complete copy stays, and nothing
    # older than it exists; after a new complete one, step 2 goes.
    assert remote.prune(1) == []
    remote.upload(_local_checkpoint(local, 8))
    assert remote.prune(1) == ["step_00000002", "step_00000004", "step_00000006"]
    assert remote.tags() == ["step_00000008"]


def test_uploader_runs_in_the_background_and_protects_its_checkpoint(remote, tmp_path):
    local = tmp_path / "local"
    uploader = Uploader(remote, keep_last=2)
    for step in (1, 2, 3):
        uploader.submit(_local_checkpoint(local, step, payload=os.urandom(1 << 20)))
        assert f"step_{step:08d}" in uploader.in_flight()
    uploader.close()
    assert not uploader.in_flight()
    # The last one is always uploaded; one that waited may have been replaced by a newer one.
    assert "step_00000003" in remote.tags() and remote.problem("step_00000003") is None
    assert len([t for t in remote.tags() if remote.problem(t) is None]) <= 2


@pytest.mark.parametrize("name, saved_with, expected", [
    ("tp", "parallel.tensor_parallel=2", "was saved with parallel.tensor_parallel=2, this run has 1: resume with"),
    ("model", "model.overrides={text.pool: paper}", "differing: text.pool: checkpoint 'paper', this run 'masked_mean'"),
])
def test_a_remote_copy_of_another_tp_size_or_model_is_refused_before_any_engine(
        s3, monkeypatch, tmp_path, demo_data, name, saved_with, expected):
    """A wiped scratch disk: the run directory is empty and the only checkpoint is the remote copy. Its
    record (a run of the demo recipe with ``saved_with``) is what train.py must check before it builds
    an engine or downloads anything: exit 2, one line naming the remote copy, no file written anywhere."""
    from rwkvclip_dist.model.registry import get_model_config
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.typed_config import to_plain

    data = [f"data.streams=[{{remote: {demo_data / 'train'}}}]"]
    saved = load_recipe(DEMO_RECIPE, [*data, "eval.zeroshot=[]", saved_with], check_paths=False)
    tp = saved.parallel.tensor_parallel
    record = RunRecord(step=3, world_size=2 * tp, tensor_parallel=tp, recipe=to_plain(saved),
                       model=to_plain(get_model_config(saved.model.name, **saved.model.overrides)))
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    remote = RemoteCheckpoints(f"s3://ckpt/refused_{name}", CLIENT_FILE)
    tag_dir = _local_checkpoint(tmp_path / "elsewhere", 3)
    torch.save(record.to_dict(), tag_dir / CLIENT_FILE)
    remote.upload(tag_dir)
    before = {key: size for key, size in remote._objects("step_00000003").items()}

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, *train_args(run, demo_data, "train.steps=4",
                                                       f"checkpoint.remote={remote.url}")],
                          cwd=REPO, env=dist_env(**s3.env), capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"train.py: error: checkpoint {remote.url}/step_00000003 "), lines
    assert expected in lines[0], lines[0]
    assert not run.exists(), sorted(run.rglob("*"))
    assert remote._objects("step_00000003") == before and remote.tags() == ["step_00000003"]


@pytest.mark.slow
def test_killed_during_upload_then_wiped_resumes_from_the_newest_complete_remote_copy(
        s3, tmp_path, demo_data, reference_losses, clean_shm, monkeypatch):
    """The reference is the 2-rank run of conftest's REFERENCE_STEPS (saves every 3 steps)."""
    url, prefix = "s3://ckpt/killed", "killed"
    run = tmp_path / "run"
    args = train_args(run, demo_data, *REFERENCE_STEPS, f"checkpoint.remote={url}")
    env = dist_env(**s3.env)
    launcher = subprocess.Popen(torchrun_cmd(2, *args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    client = s3.client()
    deadline, caught = time.time() + 300, None
    # Kill once a checkpoint after the first complete remote one is being uploaded: objects of its
    # tag are there, its marker is not.
    while caught is None and launcher.poll() is None and time.time() < deadline:
        keys = [o["Key"] for o in client.list_objects_v2(Bucket="ckpt", Prefix=prefix + "/").get("Contents", [])]
        tags = {k.split("/")[1] for k in keys if "/step_" in k}
        done = {k.split("/")[1] for k in keys if k.endswith("/" + CLIENT_FILE)}
        partial = sorted(tags - done)
        if done and partial:
            # The ranks too, at once: an orphaned rank would notice its launcher gone and save.
            for process in rank_processes(launcher).values():
                process.send_signal(signal.SIGKILL)
            os.killpg(launcher.pid, signal.SIGKILL)
            caught = partial[-1]
        time.sleep(0.01)
    launcher.wait(60)
    assert caught, f"no upload was caught in flight (launcher exit {launcher.returncode}): " \
                   f"{launcher.stderr.read()[-3000:]}"
    # The kill may come after the last step, while its checkpoint uploads (a busy machine): the claim
    # is the same, the resumed run redoes the steps after the newest complete remote copy.

    shutil.rmtree(run)  # the wiped scratch disk
    proc = run_checked(launch_cmd(2, *args), timeout=300, env=env)
    metrics = json.loads((run / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert f"step_{resumed:08d}" < caught and resumed > 0
    assert f"killed/{caught} is not used: it has no completion marker" in proc.stdout + proc.stderr
    for record in loss_log(run):
        assert record["loss"] == reference_losses[record["step"]], record
    assert [r["step"] for r in loss_log(run)] == list(range(resumed + 1, 13))
    # After the run: its last checkpoint is complete remotely, and keep_last=2 complete copies remain.
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    store = RemoteCheckpoints(url, CLIENT_FILE)
    complete = [t for t in store.tags() if store.problem(t) is None]
    # Two complete copies (keep_last=2), the last checkpoint's among them; 9 may have been replaced
    # by 12 while 6 was still uploading.
    assert len(complete) == 2 and complete[-1] == "step_00000012"
    assert client.get_object(Bucket="ckpt", Key=f"{prefix}/latest")["Body"].read() == b"step_00000012\n"
    assert MANIFEST_FILE in store._objects("step_00000012")
