"""The shell scripts (slurm/, tools/*.sh, the test cluster): valid bash and clean under shellcheck;
the sbatch scripts are one family (every training script requeues, warns itself before the time
limit, and hands the same body a recipe that exists)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + [ROOT / "tests" / "slurm" / "cluster.sh", *sorted((ROOT / "tools").glob("*.sh"))]
TRAIN_SCRIPTS = sorted((ROOT / "slurm").glob("train_*.sh"))
BODY = re.compile(r'^rwkvclip_train (\S+) "\$@"$', re.MULTILINE)


def _sbatch_options(path: Path) -> dict[str, str]:
    options = {}
    for line in path.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].partition("=")
            options[key] = value
    return options


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (apt-get install shellcheck)")
def test_shellcheck_is_clean():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.name)
def test_training_scripts_requeue_and_save_before_the_limit(script):
    options = _sbatch_options(script)
    assert "requeue" in options
    # B: sends USR1 to the batch shell, which forwards it to the ranks and requeues the job after they saved.
    match = re.fullmatch(r"B:USR1@(\d+)", options.get("signal", ""))
    assert match and int(match.group(1)) > 0, f"{script.name}: --signal={options.get('signal')}"
    assert options.get("ntasks-per-node") == "1", "one launcher (torchrun) per node"
    assert options.get("open-mode") == "append", "a requeued job must not truncate its own log"


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.name)
def test_training_scripts_share_one_body_and_name_a_real_recipe(script):
    text = script.read_text()
    bodies = BODY.findall(text)
    assert len(bodies) == 1, f"{script.name} must end in exactly one rwkvclip_train call"
    assert (ROOT / bodies[0]).is_file(), f"{script.name} names {bodies[0]}, which does not exist"
    assert 'source "${RWKVCLIP_REPO:-$SLURM_SUBMIT_DIR}/slurm/common.sh"' in text
    # Only resources may differ: no script runs srun/torchrun/python on its own.
    assert not re.search(r"^\s*(srun|torchrun|python|deepspeed)\b", text, re.MULTILINE)


@pytest.mark.parametrize("script", TRAIN_SCRIPTS, ids=lambda p: p.name)
def test_multi_node_recipes_fix_a_sample_order_their_node_counts_divide(script):
    """Streaming computes the sample order for ``num_canonical_nodes``; left unset it is the node count
    of the first run, so a requeued job started afresh on fewer nodes would see other samples. Every
    recipe a multi-node script runs fixes it, and the script's node count divides it."""
    from rwkvclip_dist.training.recipe import load_recipe

    nodes = int(_sbatch_options(script)["nodes"])
    recipe = load_recipe(ROOT / BODY.findall(script.read_text())[0], check_paths=False)
    canonical = recipe.data.num_canonical_nodes
    if nodes == 1 and canonical is None:
        return
    assert canonical is not None, f"{script.name}: its recipe leaves data.num_canonical_nodes unset"
    assert canonical % nodes == 0, f"{script.name}: {nodes} nodes do not divide num_canonical_nodes {canonical}"


def test_common_body_refuses_to_run_outside_slurm(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train_demo.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    # Without SLURM_SUBMIT_DIR the script cannot even find common.sh; with it, the body says why it stops.
    assert result.returncode != 0 and "slurm/common.sh" in result.stderr
    env["SLURM_SUBMIT_DIR"] = str(ROOT)
    result = subprocess.run(["bash", str(ROOT / "slurm" / "train_demo.sh")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "not inside a Slurm job" in result.stderr
