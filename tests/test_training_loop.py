"""The loop in this process, over a small stand-in engine (DeepSpeed's part is not what is tested
here; the subprocess runs in test_train*.py use the real one): a real tiny model, loss, schedule and
checkpoint manager, batches from a list. The manager decides the saves (interval, last step, a stop),
a SIGTERM stops the loop after the step it arrived in, and a resume continues the counters."""
from __future__ import annotations

import json
import math
import os
import signal
from types import SimpleNamespace

import pytest
import torch

from conftest import DEMO_RECIPE
from rwkvclip_dist.checkpoint.manager import CheckpointManager
from rwkvclip_dist.checkpoint.record import RunRecord
from rwkvclip_dist.loss import build_loss
from rwkvclip_dist.model.registry import create_model
from rwkvclip_dist.parallel.launch_env import LaunchEnv
from rwkvclip_dist.training.components import Components
from rwkvclip_dist.training.loop import Trainer
from rwkvclip_dist.training.ownership import LauncherWatch
from rwkvclip_dist.training.recipe import load_recipe
from rwkvclip_dist.training.schedule import build_schedule

BATCH = 4
torch.set_num_threads(1)  # the test machine's cores are shared; a tiny model gains nothing from more


class StandInEngine:
    """What the loop and the manager ask of DeepSpeed's engine, for one process without ZeRO."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        self.checkpoint_engine = SimpleNamespace()

    def __call__(self, images, tokens):
        return self.module(images, tokens)

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def get_global_grad_norm(self) -> float:
        return 0.0

    def zero_optimization_partition_weights(self) -> bool:
        return False

    def save_checkpoint(self, directory: str, tag: str, save_latest: bool) -> None:
        os.makedirs(f"{directory}/{tag}", exist_ok=True)
        torch.save(self.module.state_dict(), f"{directory}/{tag}/model.pt")

    def load_checkpoint(self, directory: str, tag: str):
        self.module.load_state_dict(torch.load(f"{directory}/{tag}/model.pt", weights_only=True))
        return f"{directory}/{tag}", {}


class ListLoader:
    """Batches from a list, with the position as its state; ``on_batch`` runs before batch i is given."""

    def __init__(self, batches: list, on_batch=None) -> None:
        self.batches, self.position, self.on_batch = batches, 0, on_batch or (lambda i: None)

    def __iter__(self):
        while self.position < len(self.batches):
            self.on_batch(self.position)
            self.position += 1
            yield self.batches[self.position - 1]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _batches(n: int) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(torch.rand(BATCH, 3, 32, 32, generator=generator), torch.randint(1, 400, (BATCH, 77), generator=generator),
             torch.zeros(BATCH, dtype=torch.long)) for _ in range(n)]


def _trainer(run_dir, steps: int, every: int, on_batch=None, *extra: str) -> Trainer:
    recipe = load_recipe(DEMO_RECIPE, [f"train.steps={steps}", f"checkpoint.every_steps={every}", "eval.zeroshot=[]",
                                       "logging.tensorboard=false", "logging.progress_bar=false",
                                       f"data.batch_size={BATCH}", *extra], check_paths=False)
    torch.manual_seed(0)
    model = create_model("tiny")
    engine = StandInEngine(model)
    parts = Components(
        engine=engine, model_config=model.config, base_lrs=[1e-3], device=torch.device("cpu"), dtype=torch.float32,
        loss_fn=build_loss(recipe.loss), loader=ListLoader(_batches(steps), on_batch),
        dataset=SimpleNamespace(num_corrupt=0), schedule=build_schedule(recipe.schedule, steps),
        checkpoints=CheckpointManager(run_dir / "checkpoints", 2, every, last_step=steps), evals=[],
        global_batch=BATCH, groups=SimpleNamespace(tensor_parallel=1, dp_size=1, dp_group=None))
    launch = LaunchEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, master_addr="", master_port=0,
                       launcher="single")
    return Trainer(recipe, run_dir, launch, parts, RunRecord(step=0, world_size=1), LauncherWatch("single"))


def _saved(run_dir) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))


def test_the_manager_saves_at_its_interval_and_the_last_step(tmp_path):
    trainer = _trainer(tmp_path, steps=5, every=2)
    metrics = trainer.run()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert metrics["status"] == "completed" and metrics["steps"] == 5 and metrics["samples"] == 5 * BATCH
    assert len(losses) == 5 and metrics["final_loss"] == losses[-1] == trainer.state.last_finite_loss
    assert _saved(tmp_path) == ["step_00000004", "step_00000005"]  # 2 was pruned (keep_last 2)
    record = CheckpointManager(tmp_path / "checkpoints").read_record("step_00000005")
    assert (record.step, record.world_size) == (5, 1)


def test_a_stop_signal_saves_the_step_it_came_in_and_a_resume_continues(tmp_path):
    def signal_before(i: int) -> None:
        if i == 2:  # while the loop fetches step 3's batch
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    metrics = _trainer(tmp_path, steps=6, every=0, on_batch=signal_before).run()
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    assert (metrics["status"], metrics["steps"]) == ("preempted", 3)
    assert _saved(tmp_path) == ["step_00000003"]
    stopped_loss = metrics["final_loss"]

    resumed = _trainer(tmp_path, steps=6, every=0)
    resumed._resume()
    assert (resumed.state.step, resumed.state.samples, resumed.state.last_finite_loss) == (3, 3 * BATCH, stopped_loss)
    assert resumed.parts.loader.position == 3
    metrics = _trainer(tmp_path, steps=6, every=0).run()
    assert (metrics["status"], metrics["steps"], metrics["resumed_from_step"]) == ("completed", 6, 3)
    assert _saved(tmp_path) == ["step_00000003", "step_00000006"] and math.isfinite(metrics["final_loss"])
    steps = [json.loads(line)["step"] for line in (tmp_path / "loss_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_too_many_non_finite_steps_stop_the_loop(tmp_path):
    from rwkvclip_dist.training.loop import NonFiniteLossError

    trainer = _trainer(tmp_path, 5, 0, None, "train.max_nonfinite_steps=3")
    with torch.no_grad():
        trainer.parts.engine.module.logit_scale.fill_(math.nan)
    with pytest.raises(NonFiniteLossError, match="non-finite for 3 steps in a row"):
        trainer.run()
    assert trainer.state.step == 3 and trainer.state.nonfinite_in_a_row == 3 and math.isnan(trainer.state.last_finite_loss)
