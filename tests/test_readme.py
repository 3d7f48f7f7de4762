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


def test_demo_recipe_header_and_readme_report_the_same_measurement():
    import re

    readme = (ROOT / "README.md").read_text()
    default = readme[readme.index("**The embedded default**"):]
    top1, wall = re.search(r"\*\*([\d.]+)% zero-shot top-1\*\*.*? in (\d+ min \d+ s)", default, re.S).groups()
    header = (ROOT / "recipes" / "demo_digits.yaml").read_text().split("\n\n", 1)[0]
    assert f"{top1}% top-1" in header and f"in {wall} wall" in header, "recipes/demo_digits.yaml header is stale"
    assert f"{wall} wall" in (ROOT / "docs" / "training.md").read_text()
