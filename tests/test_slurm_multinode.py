"""A real two-node Slurm job on this one machine, and the loss of one of its nodes.

``tests/slurm/cluster.sh`` with SLURM_TEST_NODES=2 runs two slurmd daemons, nodes ``<host>`` and
``<host>-n2``, each with its own port, spool and pid file; ``sbatch --nodes=2 slurm/train_demo.sh``
then runs exactly what a cluster runs: the batch shell on the first node, ``srun`` starting
``slurm/launch_node.sh`` on each node, one torchrun per node meeting at the c10d rendezvous on the
first node, one rank per node. What is not real: both nodes share this machine's kernel, so a
killed node's sockets are closed by it (a powered-off node's are not; that case is the frozen peer
of tests/test_rank_failures.py, detected after parallel.timeout_s).

The node is lost by SIGKILLing its slurmd and every process of the job on it. The survivor exits,
srun reports the node failure, Slurm requeues the job (``--requeue``; had only the step failed, the
batch shell would requeue it: slurm/common.sh), the node's slurmd comes back, and the requeued job
resumes. Each node has a /dev/shm of its own (cluster.sh), as separate machines have. Every step's loss, before and after, equals a one-node run with the same global batch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest

from conftest import REFERENCE_STEPS, loss_log
from slurm_cluster import CLUSTER, ROOT, Cluster, job_venv

pytestmark = pytest.mark.skipif(
    shutil.which("slurmctld") is None and os.geteuid() != 0,
    reason="needs the slurm-wlm and munge packages, or root to install them")

FAST = ["eval.zeroshot=[]", "logging.every_steps=1", "logging.progress_bar=false", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    state = tmp_path_factory.mktemp("slurm2")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    start = subprocess.run(["bash", str(CLUSTER), "start", str(state)], capture_output=True, text=True,
                           timeout=600, env=dict(env, SLURM_TEST_NODES="2"))
    if start.returncode != 0:
        subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True)
        pytest.fail(f"could not start the two-node test cluster: {start.stderr}")
    runs = state / "runs"
    runs.mkdir()
    env.update(SLURM_CONF=start.stdout.strip().splitlines()[-1], RWKVCLIP_RUNS=str(runs), NPROC_PER_NODE="1",
               RWKVCLIP_VENV=job_venv(),
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))
    yield Cluster(state, runs, env)
    subprocess.run(["bash", str(CLUSTER), "stop", str(state)], capture_output=True, timeout=120)


def _kill_node(state, node: str, job_id: str) -> int:
    """SIGKILL the node's slurmd and every process of the job on it (and their slurmstepd)."""
    import psutil

    victims = {int((state / f"slurmd-{node}.pid").read_text())}
    for proc in psutil.process_iter():
        try:
            env = proc.environ()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if env.get("SLURMD_NODENAME") == node and env.get("SLURM_JOB_ID") == job_id:
            victims.add(proc.pid)
            victims.update(p.pid for p in proc.parents() if p.name() == "slurmstepd")
    for pid in victims:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
    return len(victims)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_nodes_equal_one_and_a_lost_node_ends_the_job_which_requeues_and_resumes(two_nodes, demo_data,
                                                                                      reference_losses):
    cluster, name = two_nodes, "demo-2nodes"
    run_dir = cluster.runs / name
    overrides = [f"data.streams=[{{remote: {demo_data / 'train'}}}]", "data.batch_size=16", *REFERENCE_STEPS,
                 *FAST, "parallel.timeout_s=60"]
    job_id = cluster.run("sbatch", "--parsable", "--nodes=2", f"--job-name={name}",
                         f"--output={cluster.runs}/%x-%j.out", "slurm/train_demo.sh", *overrides).strip()
    cluster.wait("five steps", lambda: len(loss_log(run_dir)) >= 5, 300, job_id, name)
    assert cluster.job(job_id)["NumNodes"] == "2"

    node = f"{subprocess.run(['hostname', '-s'], capture_output=True, text=True).stdout.strip()}-n2"
    assert _kill_node(cluster.state, node, job_id) >= 4  # slurmd, slurmstepd, launcher, torchrun, rank
    killed_at = time.monotonic()
    # No hang: the job ends and is requeued once slurmctld declares the node down (SlurmdTimeout, 10 s here).
    cluster.wait("the requeue", lambda: cluster.job(job_id)["Restarts"] == "1", 300, job_id, name)
    requeued_after = time.monotonic() - killed_at
    killed_at_step = len(loss_log(run_dir))  # (the step in flight at the kill may still have been logged)
    batch_log = cluster.batch_log(name, job_id)
    # Requeued by Slurm (the node failed; the job has --requeue) or by the batch shell (its step failed),
    # whichever notices first.
    assert "DUE TO NODE FAILURE" in batch_log or "job step failed" in batch_log, batch_log[-3000:]
    node0 = cluster.node_log(name, job_id, 0)  # the surviving node (either rank may live there)
    assert "lost contact with a peer rank" in node0, node0[-3000:]

    # The node comes back (on a real cluster the job would go to another one).
    subprocess.run(["bash", str(CLUSTER), "start-node", str(cluster.state), node], check=True, timeout=120,
                   env=cluster.env, capture_output=True)
    cluster.start_now(job_id, name)
    job = cluster.wait_done(job_id, name, timeout=400)
    assert job["JobState"] == "COMPLETED", cluster.batch_log(name, job_id)[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    resumed = metrics["resumed_from_step"]
    assert (metrics["status"], metrics["steps"], metrics["world_size"]) == ("completed", 12, 2)
    assert 3 <= resumed <= killed_at_step and resumed % 3 == 0
    records = loss_log(run_dir)
    assert [r["step"] for r in records] == list(range(1, killed_at_step + 1)) + list(range(resumed + 1, 13))
    # Two nodes x 1 rank == one node x 2 ranks (the reference), before the loss and after the resume.
    for record in records:
        assert record["loss"] == reference_losses[record["step"]], record
    print(f"\nnode lost at step {killed_at_step}: job requeued {requeued_after:.1f} s later, resumed from step "
          f"{resumed}")
