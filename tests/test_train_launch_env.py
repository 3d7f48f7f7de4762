"""Rank, world size and rendezvous address from torchrun/deepspeed, Slurm, or a lone process."""
from __future__ import annotations

import pytest

from rwkvclip_dist.parallel.launch_env import detect_launch_env, expand_nodelist


def test_torchrun_and_deepspeed_variables_win():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "MASTER_ADDR": "n0",
           "MASTER_PORT": "1234", "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "x"}
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (3, 8, 1, 4)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("n0", 1234, "torchrun")


def test_slurm_variables_and_first_node_as_master():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    launch = detect_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank, launch.local_world_size) == (5, 8, 1, 4)
    assert launch.master_addr == "gpu07" and launch.launcher == "slurm"
    assert launch.master_port == detect_launch_env(env).master_port  # same on every task of the job


def test_single_process_default():
    launch = detect_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,7]", ["gpu01", "gpu02", "gpu03", "gpu7"]),
    ("a[1-2],b3,c[09-10]-ib", ["a1", "a2", "b3", "c09-ib", "c10-ib"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect_launch_env({"RANK": "0", "WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match="SLURM_JOB_NODELIST"):
        detect_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"})


def test_the_tests_launcher_sets_the_rank_variables_and_stops_on_a_failed_rank(tmp_path):
    """tests/launch_ranks.py (the tests' stand-in for torchrun where the launcher is not under test):
    each rank gets the deepspeed launcher's variables; a failing rank ends the others and sets the
    launcher's exit status, without waiting for the slower ranks."""
    import subprocess
    import time

    from conftest import dist_env, launch_cmd

    script = tmp_path / "rank.py"
    script.write_text("import os, sys, time\n"
                      "print(*(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE')))\n"
                      "if len(sys.argv) > 1 and os.environ['RANK'] == '1': sys.exit(3)\n"
                      "if len(sys.argv) > 1: time.sleep(120)\n")
    ok = subprocess.run(launch_cmd(2, str(script)), capture_output=True, text=True, timeout=60, env=dist_env())
    assert ok.returncode == 0 and sorted(ok.stdout.splitlines()) == ["0 0 2 2", "1 1 2 2"]
    start = time.monotonic()
    failed = subprocess.run(launch_cmd(2, str(script), "fail"), capture_output=True, text=True, timeout=60,
                            env=dist_env())
    assert failed.returncode == 3 and time.monotonic() - start < 30


@pytest.mark.parametrize("exec_ranks", ["0", "1"])
def test_the_tests_launcher_runs_each_rank_as_its_own_interpreter_would(tmp_path, exec_ranks):
    """Forked after its imports (the default) or exec'd (RWKVCLIP_LAUNCH_EXEC=1), a rank sees what
    ``python -u SCRIPT`` sees: ``__main__``, the script's folder first on ``sys.path``, its own
    arguments, seeds of its own for ``random`` and NumPy, unbuffered output, and its exit status."""
    import json
    import subprocess

    from conftest import dist_env, launch_cmd

    script = tmp_path / "rank.py"
    script.write_text("import json, os, random, sys\n"
                      "import numpy as np\n"
                      "print(json.dumps([os.environ['RANK'], __name__, sys.path[0], sys.argv, random.random(),\n"
                      "                  float(np.random.random())]))\n"
                      "import pathlib, time\n"
                      "done = pathlib.Path(__file__).with_name('rank0_printed')\n"
                      "if os.environ['RANK'] == '0': done.touch()\n"
                      "while os.environ['RANK'] == '1' and not done.exists(): time.sleep(0.01)\n"
                      "if os.environ['RANK'] == '1': raise SystemExit(7)  # after rank 0, which the launcher then stops\n")
    proc = subprocess.run(launch_cmd(2, str(script), "--flag", "x"), capture_output=True, text=True, timeout=60,
                          env=dist_env(RWKVCLIP_LAUNCH_EXEC=exec_ranks))
    assert proc.returncode == 7, proc.stderr
    rows = sorted(json.loads(line) for line in proc.stdout.splitlines())
    assert [r[:4] for r in rows] == [[rank, "__main__", str(tmp_path), [str(script), "--flag", "x"]] for rank in "01"]
    assert rows[0][4] != rows[1][4] and rows[0][5] != rows[1][5]
