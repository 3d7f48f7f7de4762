"""``model.compile``: the towers' blocks compiled by ``torch.compile`` (applied in the build step,
``parallel/compile.py``) train with the losses of the eager model. Runs on CPU with the ``aot_eager``
backend (dynamo's tracing and AOTAutograd's joint forward/backward graphs, without inductor's code
generation: with an empty inductor cache the 2-step run of the tiny model took 188-237 s against 29 s
eager on this shared CPU, docs/training.md); inductor's speed is for the GPU check."""
from __future__ import annotations

import pytest

from conftest import DEMO_RECIPE, dist_env, loss_log, launch_cmd, run_checked, train_args

ARGS = ("parallel.zero_stage=1", "train.steps=2", "model.compile_backend=aot_eager")


@pytest.mark.slow
def test_compiled_blocks_train_with_the_eager_losses(demo_data, tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_checked(launch_cmd(1, *train_args(eager, demo_data, *ARGS, "model.compile=false")), timeout=600)
    # TORCH_LOGS=graph_code prints each graph dynamo traced: the blocks really were compiled.
    proc = run_checked(launch_cmd(1, *train_args(compiled, demo_data, *ARGS, "model.compile=true")),
                       timeout=600, env=dist_env(TORCH_LOGS="graph_code"))
    output = proc.stdout + proc.stderr
    assert "TRACED GRAPH" in output, output[-3000:]
    eager_losses = [r["loss"] for r in loss_log(eager)]
    compiled_losses = [r["loss"] for r in loss_log(compiled)]
    assert len(eager_losses) == 2
    # The same operations in the same order: equal up to float32 rounding of a reordered reduction.
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5, abs=1e-6)


def test_compile_backend_is_checked():
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.typed_config import ConfigError

    with pytest.raises(ConfigError, match="compile_backend"):
        load_recipe(DEMO_RECIPE, ["model.compile=true", "model.compile_backend=fastest"], check_paths=False)
