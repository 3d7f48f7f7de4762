"""A Slurm test cluster on this machine (tests/slurm/cluster.sh) as the Slurm tests drive it: submitting
jobs, reading their state and logs, and the Python environment the jobs run in. A helper module, not a
test file; tests/test_slurm.py and tests/test_slurm_multinode.py start the clusters.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "tests" / "slurm" / "cluster.sh"


@dataclass
class Cluster:
    """A started test cluster: its state folder, the folder its jobs' runs and logs go to, and the
    environment (SLURM_CONF and the job settings) every Slurm command runs in."""

    state: Path
    runs: Path
    env: dict[str, str]

    def run(self, *args: str) -> str:
        # From the repository root: that is where sbatch scripts expect to be submitted from.
        result = subprocess.run(args, cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result.stdout

    def submit(self, name: str, *overrides: str) -> str:
        out = self.run("sbatch", "--parsable", f"--job-name={name}", f"--output={self.runs}/%x-%j.out",
                       "slurm/train_demo.sh", *overrides)
        return out.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "--oneliner", job_id).split()
        return dict(field.split("=", 1) for field in fields if "=" in field)

    def wait(self, what: str, condition, timeout: float, job_id: str, name: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = condition()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; job {job_id}: "
                             f"{self.job(job_id)}\n{self.batch_log(name, job_id)[-3000:]}")

    def wait_done(self, job_id: str, name: str, timeout: float = 240) -> dict[str, str]:
        def finished():
            job = self.job(job_id)
            return job if job["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

        return self.wait("the job to finish", finished, timeout, job_id, name)

    def start_now(self, job_id: str, name: str) -> None:
        """Slurm holds a requeued batch job for two minutes (until the old credential expires); the
        test lets it start in two seconds instead. Not at once: slurmd rejects a job credential issued
        within the same second as the revocation of the job's previous one."""
        self.wait("the requeued job to be pending", lambda: self.job(job_id)["JobState"] == "PENDING",
                  120, job_id, name)
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now+2")

    def batch_log(self, name: str, job_id: str) -> str:
        path = self.runs / f"{name}-{job_id}.out"
        return path.read_text() if path.is_file() else f"({path} does not exist)"

    def node_log(self, name: str, job_id: str, restart: int) -> str:
        return (self.runs / name / "logs" / f"{job_id}.{restart}" / "node0.log").read_text()


def job_venv() -> str:
    """The jobs' Python environment: the repository's .venv (as `make test` creates it), else this one."""
    if "RWKVCLIP_VENV" in os.environ:
        return os.environ["RWKVCLIP_VENV"]
    return str(ROOT / ".venv") if (ROOT / ".venv" / "bin" / "activate").is_file() else sys.prefix
