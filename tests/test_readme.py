"""The README's promises that code can check: the model table is current, the quick start is two make targets."""
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_readme_model_table_matches_the_registry():
    table = subprocess.run([sys.executable, str(ROOT / "tools" / "model_table.py")], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert table in (ROOT / "README.md").read_text(), "README model table is stale: rerun tools/model_table.py"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
