"""Resuming with another model is refused before anything is built or written (issue 21): run as a
user runs ``train.py`` on one process, a changed ``model.overrides`` that keeps every shape and a
changed architecture both end with exit status 2, one line naming both configurations, and not one
file of the run directory changed. A checkpoint written before the record held the model (its
``client_state.pt`` without ``model`` and ``versions``) is checked through its recipe and still resumes."""
from __future__ import annotations

import hashlib
import subprocess
import sys

import pytest
import torch

from conftest import REPO, dist_env, train_args


def _run(run, data, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *train_args(run, data, *extra)], cwd=REPO, env=dist_env(),
                          capture_output=True, text=True, timeout=300)


def _snapshot(run) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_data):
    """One single-process run of one step with its checkpoint."""
    run = tmp_path_factory.mktemp("resume_checks") / "run"
    first = _run(run, demo_data, "train.steps=1")
    assert first.returncode == 0, first.stderr[-3000:]
    return run


@pytest.mark.parametrize("override, differing", [
    ("model.overrides={text.pool: paper}", "text.pool: checkpoint 'masked_mean', this run 'paper'"),
    ("model.overrides={text.pool: masked_mean, image.depth: 3}", "image.depth: checkpoint 2, this run 3"),
])
def test_resuming_with_another_model_is_refused_and_changes_nothing(trained, demo_data, override, differing):
    before = _snapshot(trained)
    proc = _run(trained, demo_data, "train.steps=2", override)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: checkpoint "), lines
    assert "was trained as model 'tiny' with overrides {'text.pool': 'masked_mean'}" in lines[0]
    assert "this run's recipe builds 'tiny' with overrides" in lines[0] and differing in lines[0]
    assert _snapshot(trained) == before


def test_a_checkpoint_without_the_model_record_is_checked_through_its_recipe_and_resumes(trained, demo_data):
    record_file = trained / "checkpoints" / "step_00000001" / "client_state.pt"
    record = torch.load(record_file, weights_only=True)
    assert record["model"]["text"]["pool"] == "masked_mean" and record["versions"]["torch"] in torch.__version__
    older = {key: record[key] for key in ("step", "world_size", "tensor_parallel", "recipe")}
    torch.save(older, record_file)
    before = _snapshot(trained)
    refused = _run(trained, demo_data, "train.steps=2", "model.overrides={text.pool: paper}")
    assert refused.returncode == 2 and "differing: name: checkpoint 'tiny', this run 'tiny'" not in refused.stderr
    assert "text.pool: checkpoint 'masked_mean', this run 'paper'" in refused.stderr, refused.stderr[-2000:]
    assert _snapshot(trained) == before
    resumed = _run(trained, demo_data, "train.steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step_00000002"
