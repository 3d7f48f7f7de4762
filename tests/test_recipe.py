"""Recipe loading: inheritance, typed overrides, and errors that name the key and the file."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rwkvclip_dist.training.recipe import ConfigError, Recipe, load_recipe, save_recipe

RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_every_shipped_recipe_loads_and_says_what_it_expects():
    assert len(RECIPES) >= 4
    for path in RECIPES:
        recipe = load_recipe(path)
        assert isinstance(recipe, Recipe)
        header = path.read_text().split("\n\n", 1)[0].lower()
        for word in ("hardware", "time", "expected"):
            assert word in header, f"{path.name}: header comment does not state the {word}"


def test_base_inheritance_merges_sections_and_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "optimizer: {lr: 0.5, weight_decay: 0.1}\ntrain: {steps: 7}\n")
    child = write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\noptimizer: {lr: 0.25}\n")
    recipe = load_recipe(child)
    assert recipe.optimizer.lr == 0.25
    assert recipe.optimizer.weight_decay == 0.1  # kept from the base, not reset to the default
    assert recipe.train.steps == 7


def test_overrides_are_parsed_to_the_field_type(tmp_path):
    path = write(tmp_path / "r.yaml", "eval:\n  zeroshot:\n    - {name: a, data: d, classes: c}\n")
    recipe = load_recipe(path, ["optimizer.lr=3e-4", "train.steps=12", "checkpoint.resume=false",
                                "optimizer.betas=[0.9, 0.95]", "model.name=RWKV-CLIP-B-32",
                                "eval.zeroshot.0.every_steps=5", "loss.kind=siglip"])
    assert recipe.optimizer.lr == pytest.approx(3e-4) and isinstance(recipe.optimizer.lr, float)
    assert recipe.train.steps == 12
    assert recipe.checkpoint.resume is False
    assert recipe.optimizer.betas == [0.9, 0.95]
    assert recipe.model.name == "RWKV-CLIP-B-32"
    assert recipe.eval.zeroshot[0].every_steps == 5
    assert recipe.loss.kind == "siglip"


@pytest.mark.parametrize("text, key", [
    ("optimizer: {lrr: 0.1}\n", "optimizer.lrr"),
    ("optimizr: {lr: 0.1}\n", "optimizr"),
    ("data: {streams: [{remote: x, bogus: 1}]}\n", "bogus"),
])
def test_unknown_key_names_the_key_and_file(tmp_path, text, key):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert key in str(err.value) and str(path.resolve()) in str(err.value) and "unknown key" in str(err.value)


@pytest.mark.parametrize("text, key, expected", [
    ("train: {steps: ten}\n", "train.steps", "int"),
    ("train: {steps: 1.5}\n", "train.steps", "int"),
    ("checkpoint: {resume: 'yes'}\n", "checkpoint.resume", "bool"),
    ("optimizer: {lr: fast}\n", "optimizer.lr", "number"),
    ("loss: {kind: triplet}\n", "loss.kind", "one of"),
    ("optimizer: {betas: 0.9}\n", "optimizer.betas", "list"),
])
def test_wrong_type_names_the_key_and_file(tmp_path, text, key, expected):
    path = write(tmp_path / "bad.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert key in message and str(path.resolve()) in message and expected in message


def test_error_names_the_base_file_that_holds_the_bad_key(tmp_path):
    base = write(tmp_path / "base.yaml", "train: {steps: many}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\noptimizer: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=str(base.resolve())):
        load_recipe(child)


def test_command_line_errors(tmp_path):
    path = write(tmp_path / "r.yaml", "")
    with pytest.raises(ConfigError, match="command line: optimizer.lrr"):
        load_recipe(path, ["optimizer.lrr=1"])
    with pytest.raises(ConfigError, match="train.steps.*expected an int"):
        load_recipe(path, ["train.steps=abc"])
    with pytest.raises(ConfigError, match="not of the form"):
        load_recipe(path, ["train.steps"])


def test_base_cycle_and_missing_file(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    path = write(tmp_path / "r.yaml", "data: {streams: [{remote: /x}], batch_size: 8}\n")
    recipe = load_recipe(path, ["optimizer.lr=0.125"])
    save_recipe(recipe, tmp_path / "resolved.yaml")
    written = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert written["optimizer"]["lr"] == 0.125 and written["data"]["batch_size"] == 8
    assert written["parallel"]["zero_stage"] == recipe.parallel.zero_stage  # defaults are written too
    again = load_recipe(tmp_path / "resolved.yaml")
    assert again.optimizer == recipe.optimizer and again.data == recipe.data
