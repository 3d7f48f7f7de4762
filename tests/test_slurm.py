"""slurm/train_demo.sh under a real Slurm: a single-node cluster on this machine (slurmctld, slurmd and
munged from Debian's slurm-wlm, started by tests/slurm/cluster.sh), the demo recipe with 2 CPU ranks.

Nothing is simulated: sbatch runs the script, srun starts torchrun, ``scontrol requeue`` kills the
running job the way a pre-emption does, and ``scancel --batch --signal=USR1`` delivers exactly what
``#SBATCH --signal=B:USR1@<s>`` delivers before the time limit. Training is cut to a few small steps
(the full demo takes minutes); what is checked is the orchestration: trained, saved, resumed.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from slurm_cluster import CLUSTER, ROOT, Cluster, job_venv

from rwkvclip_dist.checkpoint.manager import TAG_PATTERN, tag_for_step

# Small steps: the orchestration is under test, not the learning (tests/test_demo*.py cover that).
FAST = ["data.batch_size=16", "eval.zeroshot=[]", "logging.every_steps=1", "logging.progress_bar=false",
        "logging.tensorboard=false"]
RESUMED = re.compile(r"resumed from \S+ \(step (\d+)\)")

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None and os.geteuid() != 0,
    reason="needs the slurm-wlm and munge packages, or root to install them")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm")
    start = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                           timeout=600)
    if start.returncode != 0:
        logs = "\n".join(f"== {p}\n{p.read_text()[-2000:]}" for p in sorted((state / "log").glob("*.log")))
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True)
        pytest.fail(f"could not start the test cluster: {start.stderr}\n{logs}")
    runs = state / "runs"
    runs.mkdir()
    # Variables of an enclosing Slurm job (a CI runner on a cluster) must not leak into the test's jobs.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env = dict(inherited, SLURM_CONF=start.stdout.strip().splitlines()[-1], RWKVCLIP_RUNS=str(runs),
               RWKVCLIP_VENV=job_venv(),
               RWKVCLIP_RESIGNAL_SECONDS="1",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    yield Cluster(state, runs, env)
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=120)


def _data(demo_data: Path) -> str:
    # The recipe's data/demo_digits exists only where `make demo` ran; the session's copy always does.
    return f"data.streams=[{{remote: {demo_data / 'train'}}}]"


def _latest_step(run_dir: Path) -> int | None:
    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return None
    match = TAG_PATTERN.match(latest.read_text().strip())
    return int(match.group(1)) if match else None


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _status(run_dir: Path) -> str | None:
    """The trainer's last exit status, or None while metrics.json is absent or half-written."""
    try:
        return _metrics(run_dir)["status"]
    except (FileNotFoundError, json.JSONDecodeError):
        return None


@pytest.mark.timeout(360)
def test_sbatch_trains_and_saves(cluster, demo_data):
    name = "demo-plain"
    job_id = cluster.submit(name, "train.steps=3", "checkpoint.every_steps=2", *FAST, _data(demo_data))
    job = cluster.wait_done(job_id, name)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", cluster.batch_log(name, job_id)
    run_dir = cluster.runs / name
    assert _latest_step(run_dir) == 3
    assert (run_dir / "checkpoints" / tag_for_step(2)).is_dir()
    metrics = _metrics(run_dir)
    assert (metrics["status"], metrics["steps"], metrics["world_size"]) == ("completed", 3, 2)
    assert "loss" in json.loads((run_dir / "loss_log.jsonl").read_text().splitlines()[-1])
    # One log per node and one per rank, under the job id and restart count.
    log_dir = run_dir / "logs" / f"{job_id}.0"
    assert (log_dir / "node0.log").is_file()
    rank_logs = sorted(p.parent.name for p in log_dir.glob("ranks/node0/*/attempt_0/*/stderr.log"))
    assert rank_logs == ["0", "1"]


@pytest.mark.timeout(600)
def test_requeue_and_time_limit_signal_resume_from_checkpoint(cluster, demo_data):
    name, total = "demo-requeue", 12
    run_dir = cluster.runs / name
    job_id = cluster.submit(name, f"train.steps={total}", "checkpoint.every_steps=2", *FAST, _data(demo_data))

    # 1. Pre-emption: requeue the running job once its first checkpoint exists. The ranks get SIGTERM,
    #    save where they are and exit; Slurm puts the job back in the queue under the same id.
    first = cluster.wait("the first checkpoint", lambda: _latest_step(run_dir), 240, job_id, name)
    cluster.run("scontrol", "requeue", job_id)
    cluster.wait("the requeue", lambda: cluster.job(job_id)["Restarts"] == "1", 120, job_id, name)
    cluster.wait("the pre-emption checkpoint", lambda: _status(run_dir) == "preempted", 120, job_id, name)
    saved = _latest_step(run_dir)
    assert first <= saved < total
    cluster.start_now(job_id, name)  # returns once the job is pending again, its step and logs closed
    # torchrun stood aside and let the ranks save instead of tearing them down.
    preempted_log = cluster.node_log(name, job_id, 0)
    assert f"saved step {saved}, exiting" in preempted_log and "SignalException" not in preempted_log

    # 2. Time limit: what --signal=B:USR1@<s> sends, here while the ranks are still starting up and
    #    ignore it. The batch shell forwards USR1 and repeats it (every RWKVCLIP_RESIGNAL_SECONDS) until
    #    the ranks save and exit 0, then the script requeues the job itself.
    # Once torchrun runs (its log folder exists): launch_node.sh ignores USR1 from then on. A USR1 in the
    # first milliseconds of its bash, before that trap, would end the step as failed (requeued from the
    # last checkpoint: nothing lost, but not the path this test follows).
    cluster.wait("the resumed run to start", lambda: (run_dir / "logs" / f"{job_id}.1" / "ranks").is_dir(),
                 180, job_id, name)
    cluster.run("scancel", "--batch", "--signal=USR1", job_id)
    cluster.wait("the self-requeue", lambda: cluster.job(job_id)["Restarts"] == "2", 240, job_id, name)
    before_limit = _latest_step(run_dir)
    cluster.start_now(job_id, name)

    job = cluster.wait_done(job_id, name, timeout=300)
    batch_log = cluster.batch_log(name, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", batch_log
    assert "requeueing job" in batch_log  # the self-requeue after USR1 came from slurm/common.sh
    for restart, expected in ((1, saved), (2, before_limit)):
        resumed = RESUMED.findall(cluster.node_log(name, job_id, restart))
        assert resumed == [str(expected)], f"restart {restart}: expected a resume from step {expected}, got {resumed}"
    metrics = _metrics(run_dir)
    assert (metrics["status"], metrics["steps"], metrics["resumed_from_step"]) == ("completed", total, before_limit)
    assert saved < before_limit < total
    assert _latest_step(run_dir) == total


@pytest.mark.timeout(300)
def test_shard_build_array_reruns_a_failed_part_then_merges(cluster, tmp_path):
    """slurm/submit_make_shards.sh: prepare, a 2-task array and the merge after it. Part 1 fails (a
    table without an image column); the merge fails naming it; part 1 reruns alone, part 0 is not
    rebuilt, and the merged shards equal a one-part build (a key of part 0 repeats in part 1)."""
    import sys
    import tarfile

    from conftest import add, jpeg, make_shards, read_back

    data = tmp_path / "data"
    data.mkdir()
    for t in range(3):
        with tarfile.open(data / f"t{t}.tar", "w") as tar:
            for key in [f"t{t}k{i}" for i in range(4)] + (["t0k0"] if t == 1 else []):
                add(tar, f"{key}.jpg", jpeg(t * 10 + int(key[-1])))
                add(tar, f"{key}.txt", f"{key} from t{t}".encode())
    (data / "img.jpg").write_bytes(jpeg(99))
    (data / "t3.csv").write_text("key,caption\nc0,a table row\n")  # no image column: part 1 fails
    out = tmp_path / "out"
    args = ["--input", f"{data}/t*.tar", "--input", str(data / "t3.csv"), "--out", str(out)]
    env = dict(cluster.env, SBATCH_OUTPUT=f"{cluster.runs}/%x-%j.out", PYTHONPATH=str(ROOT),
               PATH=os.path.dirname(sys.executable) + os.pathsep + cluster.env["PATH"])

    def sbatch(*argv: str) -> str:
        proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    ids = re.search(r"prepare (\d+), parts (\d+) .*, merge (\d+)",
                    sbatch("bash", "slurm/submit_make_shards.sh", "--cpus-per-task=1", "2", *args))
    merge = cluster.wait_done(ids.group(3), "shards-merge")
    assert (merge["JobState"], merge["ExitCode"]) == ("FAILED", "1:0")
    assert "part(s) 1 of 2" in cluster.batch_log("shards-merge", ids.group(3))
    finished = {p: p.stat().st_mtime_ns for p in out.glob("part-00000-of-00002/.build/*.done")}
    assert len(finished) == 2

    (data / "t3.csv").write_text(f"key,caption,image_path\nc0,a table row,{data / 'img.jpg'}\n")
    part = sbatch("sbatch", "--parsable", "--cpus-per-task=1", "--array=1", "slurm/make_shards.sh", "part", "2",
                  *args).strip()
    merge_id = sbatch("sbatch", "--parsable", "--cpus-per-task=1", f"--dependency=afterok:{part}",
                      "slurm/make_shards.sh", "merge", *args).strip()
    merge = cluster.wait_done(merge_id, "shards-merge")
    assert (merge["JobState"], merge["ExitCode"]) == ("COMPLETED", "0:0"), cluster.batch_log("shards-merge", merge_id)
    assert {p: p.stat().st_mtime_ns for p in finished} == finished, "a finished part was rebuilt"
    assert make_shards(args[:-1] + [str(tmp_path / "one"), "--workers", "1"]) == 0
    merged = read_back(str(out))
    assert merged == read_back(str(tmp_path / "one")) and len(merged) == 13
    assert merged["t0k0"]["raw"] == "t0k0 from t0"
