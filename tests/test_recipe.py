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
        recipe = load_recipe(path, check_paths=False)  # their data is not on this machine
        assert isinstance(recipe, Recipe)
        header = path.read_text().split("\n\n", 1)[0].lower()
        for word in ("hardware", "time", "expected"):
            assert word in header, f"{path.name}: header comment does not state the {word}"


def test_base_inheritance_merges_sections_and_is_relative_to_the_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "optimizer: {lr: 0.5, weight_decay: 0.1}\ntrain: {steps: 7}\n"
                                  "data: {streams: [{remote: 's3://b/x'}]}\n")
    child = write(tmp_path / "sub" / "child.yaml", "base: ../base.yaml\noptimizer: {lr: 0.25}\n")
    recipe = load_recipe(child)
    assert recipe.optimizer.lr == 0.25
    assert recipe.optimizer.weight_decay == 0.1  # kept from the base, not reset to the default
    assert recipe.train.steps == 7


def test_overrides_are_parsed_to_the_field_type(tmp_path):
    path = write(tmp_path / "r.yaml", "data: {streams: [{remote: 's3://b/x'}]}\n"
                                      "eval:\n  zeroshot:\n    - {name: a, data: d, classes: c}\n")
    recipe = load_recipe(path, ["optimizer.lr=3e-4", "train.steps=12", "checkpoint.resume=false",
                                "optimizer.betas=[0.9, 0.95]", "model.name=RWKV-CLIP-B-32",
                                "eval.zeroshot.0.every_steps=5", "loss.kind=siglip"], check_paths=False)
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
    path = write(tmp_path / "r.yaml", "{}\n")  # explicitly empty: all on the command line
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
    recipe = load_recipe(path, ["optimizer.lr=0.125"], check_paths=False)
    save_recipe(recipe, tmp_path / "resolved.yaml")
    written = yaml.safe_load((tmp_path / "resolved.yaml").read_text())
    assert written["optimizer"]["lr"] == 0.125 and written["data"]["batch_size"] == 8
    assert written["parallel"]["zero_stage"] == recipe.parallel.zero_stage  # defaults are written too
    again = load_recipe(tmp_path / "resolved.yaml", check_paths=False)
    assert again.optimizer == recipe.optimizer and again.data == recipe.data


def _shards(folder: Path) -> Path:
    """A directory that passes as an MDS stream (the loader, not the recipe, reads the shards)."""
    folder.mkdir(parents=True)
    (folder / "index.json").write_text('{"version": 2, "shards": []}')
    return folder


def test_paths_are_relative_to_the_file_that_sets_them(tmp_path, monkeypatch):
    """As ``base:`` is: a recipe's paths resolve against its own folder, a base recipe's against the
    base's folder, command-line paths against the current directory; all become absolute."""
    _shards(tmp_path / "shards" / "train")
    (tmp_path / "evaldata" / "cat").mkdir(parents=True)
    write(tmp_path / "classes.json", '{"templates": ["a {c}."]}')
    (tmp_path / "base").mkdir()
    write(tmp_path / "base" / "base.yaml", "eval:\n  zeroshot:\n    - {data: ../evaldata, classes: ../classes.json}\n")
    (tmp_path / "recipes").mkdir()
    child = write(tmp_path / "recipes" / "r.yaml", "base: ../base/base.yaml\ndata:\n  streams:\n"
                  "    - {remote: ../shards/train}\n    - {remote: 's3://bucket/x', local: cache}\n"
                  "checkpoint: {dir: ckpt}\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(child)
    assert recipe.data.streams[0].remote == str(tmp_path / "shards" / "train")
    assert recipe.data.streams[1].remote == "s3://bucket/x"  # a URL is left alone
    assert recipe.data.streams[1].local == str(tmp_path / "recipes" / "cache")
    assert recipe.eval.zeroshot[0].data == str(tmp_path / "evaldata")
    assert recipe.eval.zeroshot[0].classes == str(tmp_path / "classes.json")
    assert recipe.checkpoint.dir == str(tmp_path / "recipes" / "ckpt")
    _shards(elsewhere / "mine")
    recipe = load_recipe(child, ["data.streams.0.remote=mine", "eval.zeroshot.0.classes=imagenet"])
    assert recipe.data.streams[0].remote == str(elsewhere / "mine")
    assert recipe.eval.zeroshot[0].classes == "imagenet"  # a shipped template set, not a path


@pytest.mark.parametrize("text, key, problem", [
    ("data: {streams: [{remote: nowhere}]}\n", "data.streams[0].remote", "nowhere"),
    ("data: {streams: [{remote: empty}]}\n", "data.streams[0].remote", "has no index.json"),
    ("eval: {zeroshot: [{data: nowhere, classes: imagenet}]}\n", "eval.zeroshot[0].data", "does not exist"),
    ("eval: {zeroshot: [{data: empty, classes: imagenett}]}\n", "eval.zeroshot[0].classes", "imagenett"),
    ("eval: {zeroshot: [{data: empty, classes: imagenet, classnames: names.txt}]}\n",
     "eval.zeroshot[0].classnames", "names.txt"),
])
def test_a_wrong_path_names_the_recipe_file_and_key(tmp_path, text, key, problem):
    (tmp_path / "empty").mkdir()
    _shards(tmp_path / "shards")
    if not text.startswith("data"):
        text += "data: {streams: [{remote: shards}]}\n"
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"recipe {path.resolve()}: {key}: ") and problem in message, message
    assert "relative to the folder of the recipe" in message
    load_recipe(path, check_paths=False)  # the rest of the recipe is fine


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=-1", "optimizer.lr"),                          # FieldError of a section
    ("eval.zeroshot.0.batch_size=0", "eval.zeroshot[0].batch_size"),  # FieldError inside a list item
    ("eval.zeroshot.0.batch_size=many", "eval.zeroshot.0.batch_size"),  # wrong type
    ("data.num_workers=-1", "data.num_workers"),
    ("data.batch_size=0", "data.batch_size"),
    ("model.name=tinyy", "model.name"),
    ("data.streams.0.remote=nowhere", "data.streams[0].remote"),    # a path, relative to the cwd
])
def test_an_override_is_blamed_on_the_command_line(tmp_path, monkeypatch, override, key):
    (tmp_path / "evaldata").mkdir()
    _shards(tmp_path / "shards")
    path = write(tmp_path / "r.yaml", "data: {streams: [{remote: shards}]}\n"
                 "eval: {zeroshot: [{data: evaldata, classes: imagenet}]}\n")
    monkeypatch.chdir(tmp_path / "evaldata")
    load_recipe(path)
    with pytest.raises(ConfigError) as err:
        load_recipe(path, [override])
    assert str(err.value).startswith(f"command line: {key}: "), str(err.value)
    assert str(path) not in str(err.value)


def test_a_recipe_without_data_or_with_clashing_evaluations_is_refused(tmp_path):
    path = write(tmp_path / "r.yaml", "eval: {zeroshot: [{data: /d, classes: imagenet}, {data: /e, classes: imagenet}]}\n")
    with pytest.raises(ConfigError, match=r"eval\.zeroshot: evaluation names must differ .*\['zeroshot'\]"):
        load_recipe(path, check_paths=False)
    with pytest.raises(ConfigError, match=r"command line: data\.streams: is empty"):
        load_recipe(path, ["eval.zeroshot=[]", "data.streams=[]"], check_paths=False)


@pytest.mark.parametrize("field, value, expected", [
    ("text_weights", "{captions: 1}", "unknown text kind"),
    ("batch_size", 0, "must be >= 1"),
    ("num_workers", -1, "must be >= 0"),
    ("shuffle_algo", "py1b", "expected one of 'py1e'"),
    ("shuffle_block_size", 0, "must be >= 1"),
    ("num_canonical_nodes", 0, "must be >= 1"),
    ("shuffle_seed", -3, "must be >= 0"),
    ("predownload", 0, "must be >= 1"),
    ("image_size", 0, "must be >= 1"),
    ("hflip", 1.5, "must be in [0, 1]"),
    ("download_timeout", 0, "must be > 0"),
])
def test_data_section_values_are_checked_at_load(tmp_path, field, value, expected):
    """Mistakes Streaming or the DataLoader would report only after the engine is built, on every rank."""
    path = write(tmp_path / "r.yaml", f"data:\n  {field}: {value}\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert str(err.value).startswith(f"recipe {path.resolve()}: data.{field}: ") and expected in str(err.value)
