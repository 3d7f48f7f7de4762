"""The compat modules' version fence: a DeepSpeed or Streaming outside the range their private names
were read from is refused in one line naming both, and pyproject.toml's bounds are those ranges."""
from __future__ import annotations

import json
import os
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
    """``from streaming import X`` gives streaming.base's objects (all of its ``__all__``, checked against
    a stock import in another process); what the light import skips still imports on request."""
    import streaming
    import streaming.base

    assert streaming.StreamingDataset is streaming.base.StreamingDataset is streaming_compat.StreamingDataset
    assert streaming.MDSWriter is streaming.base.MDSWriter and streaming.__version__
    stock = subprocess.run([sys.executable, "-c", "import json, streaming.base as b; print(json.dumps(b.__all__))"],
                           capture_output=True, text=True, check=True).stdout
    assert sorted(streaming.base.__all__) == sorted(json.loads(stock))
    from streaming import StreamingDataLoader  # Streaming's own, imported on first access
    import streaming.vision

    assert streaming.vision.__name__ == "streaming.vision" and streaming.text.__name__ == "streaming.text"
    assert StreamingDataLoader.__module__ == "streaming.base.dataloader"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        streaming.nothing  # noqa: B018


@pytest.mark.parametrize("first", ["rwkvclip_dist.training.runner", "rwkvclip_dist.data.shards.builder"])
def test_no_training_rank_or_tool_imports_transformers_scikit_learn_open_clip_or_torchvision_datasets(first):
    """Each costs seconds and hundreds of MB per process (open_clip's tokenizer; Streaming's C4 dataset
    and its DataLoader's module import transformers and scikit-learn; torchvision.datasets, every data
    set's module, ~1.4 s, only for evaluation on image folders) and none is used, whichever module a
    process imports first (train.py imports the runner, make_shards the builder)."""
    code = ("import json, sys\n"
            "heavy = lambda: sorted(m for m in ('open_clip', 'transformers', 'sklearn', 'torchvision.datasets')\n"
            "                       if m in sys.modules)\n"
            "from rwkvclip_dist.data.tokenizer import tokenize; tokenize('a cat')\n"
            "alone = heavy()\n"
            f"import {first}\n"
            "import rwkvclip_dist.data.loader, rwkvclip_dist.training.runner, rwkvclip_dist.training.loop\n"
            "print(json.dumps([alone, heavy()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == [[], []]  # DeepSpeed may log a line first


def test_the_loader_counts_samples_as_streamings_does():
    """The trainer's ``StreamingDataLoader`` (no transformers) counts a batch's samples by Streaming's
    rule: a mapping by its first value, a tensor by its length, a sequence by its first member."""
    import torch

    from rwkvclip_dist.data import counting_loader

    count = counting_loader._batch_size
    assert count({"image": torch.zeros(5, 3), "text": torch.zeros(5)}) == 5
    assert count(torch.zeros(4, 2)) == 4 and count((torch.zeros(3, 2), torch.zeros(3))) == 3


def test_deepspeeds_muon_module_imports_without_compiling_and_compiles_on_first_call():
    """ZeRO's optimizers import DeepSpeed's Muon module when they are built; imported through
    ``import_muon_lazily`` its ``torch.compile`` wrappers (which import dynamo and inductor, ~2.2 s
    of CPU per rank) are made at a Muon function's first call, which still gets the compiled one."""
    code = """if True:
        import json, sys, torch
        from rwkvclip_dist.parallel import deepspeed_compat
        deepspeed_compat.import_muon_lazily()
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
        from deepspeed.runtime.zero.muon import original_muon
        heavy = [m for m in ("torch._dynamo", "torch._inductor.compile_fx") if m in sys.modules]
        compiled = []
        torch.compile = lambda fn: compiled.append(fn.__name__) or (lambda *a, **k: ("compiled", fn(*a, **k)))
        g = torch.randn(8, 4)
        first = original_muon.zeropower_via_newtonschulz5(g, steps=2)
        again = original_muon.zeropower_via_newtonschulz5(g, steps=2)
        print(json.dumps([heavy, compiled, first[0], again[0], MuonWithAuxAdam.__name__]))
    """
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert json.loads(out.splitlines()[-1]) == [[], ["zeropower_via_newtonschulz5"], "compiled", "compiled",
                                                "MuonWithAuxAdam"]


def test_deepspeed_on_cpu_builds_no_shared_memory_all_reduce(tmp_path):
    """DeepSpeed's CPU communication layer would compile its shared-memory all-reduce (~45 s of CPU on
    a fresh machine) for ``inference_all_reduce`` alone; our set-up leaves it out, and that call still
    reduces (through torch.distributed)."""
    code = """if True:
        import json, torch
        from deepspeed.comm import comm as ds_comm
        from rwkvclip_dist.parallel.engine import init_distributed
        from rwkvclip_dist.parallel.launch_env import detect_launch_env
        init_distributed(detect_launch_env({}), timeout_s=60)
        print(json.dumps([ds_comm.cdb.shm_comm_op is None, ds_comm.inference_all_reduce(torch.ones(3), ds_comm.ReduceOp.SUM).tolist()]))
    """
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path), "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert json.loads(out.splitlines()[-1]) == [True, [1.0, 1.0, 1.0]]
    assert not [p.name for p in tmp_path.iterdir() if "shm" in p.name]
