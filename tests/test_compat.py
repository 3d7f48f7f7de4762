"""The compat modules' version fence: a DeepSpeed or Streaming outside the range their private names
were read from is refused in one line naming both, and pyproject.toml's bounds are those ranges."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import REPO
from rwkvclip_dist.data import streaming_compat
from rwkvclip_dist.parallel import deepspeed_compat
from rwkvclip_dist.versions import require_version


@pytest.mark.parametrize("module, package", [(deepspeed_compat, "deepspeed"), (streaming_compat, "mosaicml-streaming")])
def test_pyproject_bounds_are_the_compat_ranges_and_ci_runs_inside(module, package):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    low, high = module.WRITTEN_FOR
    assert f"{package}>={low},<{high}" in deps
    pinned = re.search(rf"^{package}==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)[1]
    require_version(package, module.WRITTEN_FOR, "x")  # the installed one
    assert pinned.startswith(low + ".")


def test_a_version_outside_the_range_is_one_line_naming_both():
    with pytest.raises(ImportError) as err:
        require_version("deepspeed", ("0.1", "0.2"), "rwkvclip_dist/parallel/deepspeed_compat.py")
    message = str(err.value)
    assert "\n" not in message and re.search(r"deepspeed 0\.\d+\.\d+ is installed", message)
    assert "deepspeed_compat.py" in message and ">=0.1,<0.2" in message


def test_streaming_imports_light_and_whole():
    """``from streaming import X`` gives streaming.base's objects; the ready-made datasets still import."""
    import streaming
    import streaming.base

    assert streaming.StreamingDataset is streaming.base.StreamingDataset is streaming_compat.StreamingDataset
    assert streaming.MDSWriter is streaming.base.MDSWriter and streaming.__version__
    import streaming.vision

    assert streaming.vision.__name__ == "streaming.vision"


def test_neither_the_tokenizer_nor_a_training_rank_imports_scikit_learn_or_open_clip():
    """Both cost seconds per process (open_clip's tokenizer, Streaming's C4 dataset) and neither is used;
    the tokenizer alone imports no transformers either (Streaming's DataLoader still does)."""
    code = ("import json, sys\n"
            "heavy = lambda names: sorted(m for m in names if m in sys.modules)\n"
            "from rwkvclip_dist.data.tokenizer import tokenize; tokenize('a cat')\n"
            "alone = heavy(('open_clip', 'transformers', 'sklearn'))\n"
            "import rwkvclip_dist.data.loader, rwkvclip_dist.training.runner, rwkvclip_dist.training.loop\n"
            "print(json.dumps([alone, heavy(('open_clip', 'sklearn'))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [[], []]
