"""A user's mistake never loses data and never passes silently (docs/reliability.md, "User mistakes").

Each test runs a command as a user would (the tool's ``main`` in-process, through the real argument
parsing and ``cli.run_tool``; the trainer as a subprocess) and checks the exit status, the one error
line, and that no file changed (the folder hashed before and after)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from rwkvclip_dist.pretrained import load_model, save_pretrained
from tool_loader import tool_main

pytestmark = pytest.mark.timeout(300)
convert = tool_main("convert_checkpoint")


def snapshot(folder: Path) -> dict[str, str]:
    """``{relative path: sha1}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(capsys, tool: str) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("INFO ")]
    assert len(err) == 1 and err[0].startswith(f"{tool}: error: "), err
    return err[0]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    save_pretrained(load_model("tiny"), root / "tiny.safetensors")
    save_pretrained(load_model("tiny", **{"text.pool": "masked_mean"}), root / "masked.safetensors")
    return root


# -- never lose data: a tool never writes over its own input ----------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["to-authors", "{m}/tiny.safetensors", "{m}/tiny.safetensors"], "dst {m}/tiny.safetensors: is the input src"),
    (["from-authors", "{m}/tiny.safetensors", "{m}/tiny.safetensors"], "dst {m}/tiny.safetensors: is the input src"),
    (["from-zero", "{m}", "{m}/../m2/x.safetensors"], None),  # apart: refused for another reason (no checkpoint)
    (["from-zero", "{m}/sub", "{m}"], "dst {m}: holds the input src {m}/sub"),
])
def test_an_output_that_is_the_input_is_refused_and_nothing_changes(models, capsys, argv, fragment):
    before = snapshot(models)
    assert convert([a.format(m=models) for a in argv]) == 2
    line = one_line(capsys, "convert_checkpoint.py")
    if fragment is not None:
        assert fragment.format(m=models) in line, line
    else:
        assert "is the input" not in line and "holds the input" not in line, line
    assert snapshot(models) == before


def test_export_vision_encoder_never_writes_over_its_input(models, tmp_path, capsys):
    export = tool_main("export_vision_encoder")
    before = snapshot(models)
    assert export([str(models / "tiny.safetensors"), str(models / "tiny.safetensors")]) == 2
    assert f"dst {models / 'tiny.safetensors'}: is the input src" in one_line(capsys, "export_vision_encoder.py")
    assert snapshot(models) == before
    assert export([str(models / "tiny.safetensors"), str(tmp_path / "v.safetensors")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.json", "v.safetensors"]


def test_a_failed_verify_leaves_nothing_behind(models, tmp_path, capsys, caplog):
    """to-authors --accept-loss of a masked_mean model writes a file the authors' code runs with its own
    pooling: the verification fails (exit 1) and the unverified file is not left behind."""
    dst = tmp_path / "model_31.pt"
    assert convert(["to-authors", str(models / "masked.safetensors"), str(dst), "--accept-loss", "--verify"]) == 1
    err = capsys.readouterr().err
    assert "verify failed" in err and f"{dst} was not written" in err
    assert "from-authors of the converted file cannot bring them back" in caplog.text
    assert list(tmp_path.iterdir()) == []


# -- never pass silently: a conversion that cannot represent the model refuses ----------------------

def test_to_authors_refuses_an_override_it_cannot_represent(models, tmp_path, capsys):
    dst = tmp_path / "model_31.pt"
    assert convert(["to-authors", str(models / "masked.safetensors"), str(dst)]) == 2
    line = one_line(capsys, "convert_checkpoint.py")
    assert "cannot represent text.pool='masked_mean'" in line and "--accept-loss" in line, line
    assert not dst.exists()
    assert convert(["to-authors", str(models / "tiny.safetensors"), str(dst)]) == 0  # the paper's settings pass
    assert dst.is_file() and not list(tmp_path.glob(".*partial*"))


def test_from_zero_takes_a_run_directory(tmp_path, capsys):
    """A run directory (recipe.yaml + checkpoints/) is read through its checkpoints/ folder."""
    from rwkvclip_dist.convert.pipeline import checkpoint_folder

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "recipe.yaml").write_text("model: {name: tiny}\n")
    assert convert(["from-zero", str(run), str(tmp_path / "x.safetensors")]) == 2
    line = one_line(capsys, "convert_checkpoint.py")
    assert f"{run} is a run directory without checkpoints/latest" in line, line
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    assert checkpoint_folder(run) == run / "checkpoints"


# -- never lose data: another job's output is not replaced silently ---------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    """Two small ImageNet-style folders (class subfolders of JPEGs)."""
    from conftest import jpeg

    root = tmp_path_factory.mktemp("folders")
    for name, classes in (("pets", ("cat", "dog")), ("colours", ("blue", "green", "red"))):
        for k, c in enumerate(classes):
            (root / name / c).mkdir(parents=True)
            for i in range(2):
                (root / name / c / f"{c}_{i}.jpg").write_bytes(jpeg(10 * k + i, size=(32, 32)))
    return root


def test_make_shards_refuses_to_replace_another_build(folders, tmp_path, capsys):
    from conftest import make_shards

    out = tmp_path / "out"
    first = ["--input", str(folders / "pets"), "--out", str(out), "--workers", "1", "--labels", "folder"]
    assert make_shards(first) == 0
    before = snapshot(out)
    assert make_shards(first) == 0  # the same build again: resumes (nothing to do), still allowed
    other = ["--input", str(folders / "colours"), "--out", str(out), "--workers", "1", "--labels", "folder"]
    capsys.readouterr()
    assert make_shards(other) == 2
    line = one_line(capsys, "make_shards.py")
    assert f"--out {out}: holds another build" in line and "differs in inputs" in line and "--overwrite" in line
    assert snapshot(out) == before
    assert make_shards(other + ["--overwrite"]) == 0
    units = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != ".build")
    assert len(units) == 1 and "colours" in units[0], units  # the first build's shards are gone, not orphaned


@pytest.mark.parametrize("where", ["inside the input", "a folder of other files"])
def test_make_shards_refuses_an_output_folder_that_is_not_its_own(folders, tmp_path, capsys, where):
    from conftest import make_shards

    if where == "inside the input":
        out, expected = folders / "pets" / "shards", "is inside the input --input"
    else:
        out, expected = tmp_path / "mine", "is not empty and holds no make_shards build record"
        out.mkdir()
        (out / "notes.txt").write_text("my notes\n")
    before = snapshot(folders), snapshot(tmp_path)
    assert make_shards(["--input", str(folders / "pets"), "--out", str(out), "--workers", "1", "--labels", "folder"]) == 2
    assert expected in one_line(capsys, "make_shards.py")
    assert (snapshot(folders), snapshot(tmp_path)) == before


# -- class lists must fit the data; one bad image does not end an evaluation ------------------------

evaluate = tool_main("evaluate")


@pytest.fixture(scope="module")
def pets_mds(folders, tmp_path_factory) -> Path:
    """A labelled MDS set of two classes (cat, dog), as make_shards --labels folder writes it."""
    from conftest import make_shards

    out = tmp_path_factory.mktemp("pets_mds") / "val"
    assert make_shards(["--input", str(folders / "pets"), "--out", str(out), "--labels", "folder", "--workers", "1"]) == 0
    return out


def _zeroshot(models, data, tmp_path, *extra) -> int:
    return evaluate(["--model", str(models / "tiny.safetensors"), "--task", "zeroshot", "--data", str(data),
                     "--workers", "0", "--batch-size", "4", "--output", str(tmp_path / "r.json"), *extra])


@pytest.mark.parametrize("lines, expected", [
    ("cat\ncat\n", "class-names file {f}:2: class 'cat' repeats line 1"),
    ("cat\n\ndog\n", "class-names file {f}:2: empty class name"),
])
def test_a_class_list_with_blank_or_repeated_lines_is_refused(models, folders, pets_mds, tmp_path, capsys,
                                                              lines, expected):
    names = tmp_path / "names.txt"
    names.write_text(lines)
    for data in (folders / "pets", pets_mds):
        assert _zeroshot(models, data, tmp_path, "--classnames", str(names)) == 2
        assert expected.format(f=names) in one_line(capsys, "evaluate.py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["names.txt"]


def test_a_labelled_set_scored_against_another_class_list_is_refused(models, pets_mds, tmp_path, capsys):
    """The cat/dog set against CIFAR-10's ten names: in the tool and in the in-loop evaluation alike."""
    from rwkvclip_dist.training.evals import ZeroShotEvalSection, open_evaluations

    assert _zeroshot(models, pets_mds, tmp_path, "--templates", "cifar10") == 2
    line = one_line(capsys, "evaluate.py")
    assert "its labels run 0..1 (2 classes) but there are 10 class names" in line, line
    with pytest.raises(ValueError, match=r"its labels run 0\.\.1 \(2 classes\) but there are 10 class names"):
        open_evaluations([ZeroShotEvalSection(data=str(pets_mds), classes="cifar10")], "tiny", {}, torch.device("cpu"))
    assert list(tmp_path.iterdir()) == []


def test_an_unreadable_image_is_counted_and_left_out(models, folders, tmp_path):
    import shutil

    data = tmp_path / "pets"
    shutil.copytree(folders / "pets", data)
    (data / "cat" / "broken.jpg").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "n.txt").write_text("cat\ndog\n")
    assert _zeroshot(models, data, out, "--classnames", str(tmp_path / "n.txt")) == 0
    result = json.loads((out / "r.json").read_text())["results"]["zeroshot"]
    assert result["n"] == 4 and result["unreadable_images"] == 1


# -- never lose data: evaluation results are not replaced silently ----------------------------------

def test_evaluation_results_are_not_replaced_silently(models, folders, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    (tmp_path / "r.json").write_text('{"an earlier": "evaluation"}\n')
    before = snapshot(tmp_path)
    assert _zeroshot(models, folders / "pets", tmp_path, "--classnames", str(names)) == 2
    assert f"--output {tmp_path / 'r.json'}: exists (the results of an earlier evaluation)" in one_line(
        capsys, "evaluate.py")
    assert snapshot(tmp_path) == before
    assert evaluate(["--model", str(models / "tiny.safetensors"), "--task", "zeroshot", "--data", str(folders / "pets"),
                     "--classnames", str(names), "--output", str(names), "--overwrite"]) == 2
    assert "is the input --classnames" in one_line(capsys, "evaluate.py")
    assert snapshot(tmp_path) == before
    assert _zeroshot(models, folders / "pets", tmp_path, "--classnames", str(names), "--overwrite") == 0
    text = (tmp_path / "r.json").read_text()
    assert json.loads(text)["results"]["zeroshot"]["n"] == 4 and "NaN" not in text


# -- a refused or finished run changes nothing in its run directory; every JSON written is strict ---

def _strict(text: str):
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def finished_run(demo_data, tmp_path_factory):
    """One finished single-process run of the demo recipe: 2 steps, the step line every 2 steps."""
    from conftest import PYTHON, dist_env, run_checked, train_args

    run = tmp_path_factory.mktemp("finished") / "run"
    args = train_args(run, demo_data, "train.steps=2", "logging.every_steps=2", "checkpoint.every_steps=0")
    proc = run_checked([PYTHON, *args], timeout=240, env=dist_env())
    return run, args, proc.stdout + proc.stderr


def test_a_run_says_what_its_loss_is_and_writes_strict_json(finished_run):
    run, _, output = finished_run
    assert "step 2/2 loss (mean of the last 2 steps) " in output, output[-2000:]
    metrics = _strict((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and math.isfinite(metrics["final_loss"])
    assert [_strict(line)["step"] for line in (run / "loss_log.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.parametrize("extra, status, expected", [
    ((), 0, "train.py: the run in {run} is complete at step 2"),
    (("checkpoint.resume=false", "optimizer.lr=0.5"), 1, "checkpoint.resume is false but {run}/checkpoints holds"),
])
def test_a_refused_or_finished_run_changes_nothing(finished_run, extra, status, expected):
    import subprocess

    from conftest import PYTHON, dist_env

    run, args, _ = finished_run
    before = snapshot(run)
    proc = subprocess.run([PYTHON, *args, *extra], capture_output=True, text=True, timeout=240, env=dist_env())
    assert proc.returncode == status, proc.stderr[-3000:]
    assert expected.format(run=run) in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(run) == before


def test_json_writers_are_strict(tmp_path):
    from rwkvclip_dist.outputs import strict_json, write_json

    write_json(tmp_path / "m.json", {"final_loss": float("nan"), "rates": [1.0, float("inf")]})
    assert _strict((tmp_path / "m.json").read_text()) == {"final_loss": None, "rates": [1.0, None]}
    assert strict_json({"loss": float("-inf")}) == '{"loss": null}'
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]


# -- a recipe mistake is never resolved by a guess ------------------------------------------------

@pytest.mark.parametrize("body, expected", [
    ("base: {demo}\noptimizer:\n  lr: 0.1\noptimizer:\n  lr: 0.2\n",
     "line 4: optimizer: given twice (first on line 2)"),
    ("base: {demo}\ncheckpoint:\n  resume: no\n", "line 3: checkpoint.resume: 'no' is read by YAML as the boolean False"),
    ("base: {demo}\ntrain:\n  steps: 0100\n", "line 3: train.steps: '0100' is read by YAML as the octal number 64"),
    ("base: {demo}\nschedule:\n  warmup_steps: 1:30\n", "line 3: schedule.warmup_steps: '1:30' is read by YAML as a base-60"),
    ("base: {demo}\non: 1\n", "line 2: key 'on' is not read as a string by YAML"),
    ("# nothing yet\n", "the file is empty (no keys, only comments)"),
    ("", "the file is empty (no keys)"),
])
def test_a_recipe_mistake_is_an_error_naming_file_line_and_key(tmp_path, capsys, body, expected):
    """train.py's main in-process (the recipe fails before any process starts): exit 2, the one
    line, no run directory."""
    from conftest import DEMO_RECIPE
    from rwkvclip_dist.train import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(body.format(demo=DEMO_RECIPE))
    with pytest.raises(SystemExit) as stop:
        main(["--recipe", str(recipe), "--run-dir", str(tmp_path / "run")])
    assert stop.value.code == 2
    assert one_line(capsys, "train.py").startswith(f"train.py: error: recipe {recipe}: {expected}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_a_recipe_that_is_a_folder_names_it(tmp_path):
    from rwkvclip_dist.training.recipe import load_recipe
    from rwkvclip_dist.typed_config import ConfigError

    with pytest.raises(ConfigError, match=rf"recipe {tmp_path}: is a directory; give the path of a text file"):
        load_recipe(tmp_path)


# -- the description, caption and tag tools ------------------------------------------------------

def _samples(path: Path, n: int) -> Path:
    rows = [{"key": f"s{i:03d}", "raw": f"IMG_{i}.jpg key=s{i:03d}", "synthetic": "two brown dogs running on a beach",
             "tags": ["dog", "beach", "sand"]} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_a_server_that_is_not_openai_compatible_fails_fast(tmp_path, capsys):
    """Python's http.server: no /v1/models (404: the name cannot be checked), and 501 for every POST."""
    import threading
    import time
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from rwkvclip_dist.descriptions.cli import main

    posts = []

    class Handler(SimpleHTTPRequestHandler):
        def do_POST(self):
            posts.append(self.path)  # what http.server itself answers to a POST
            self.send_error(501, f"Unsupported method ({self.command!r})")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: Handler(*a, directory=str(tmp_path / "www")))
    (tmp_path / "www").mkdir()
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    src = _samples(tmp_path / "in.jsonl", 300)
    start = time.monotonic()
    try:
        status = main(["--input", str(src), "--out", str(tmp_path / "out.jsonl"), "--base-url",
                       f"http://127.0.0.1:{httpd.server_address[1]}", "--model", "m", "--no-progress"])
    finally:
        httpd.shutdown()
    elapsed = time.monotonic() - start
    assert status == 2
    err = capsys.readouterr().err
    assert "the first 16 requests all failed with http_501" in err and "OpenAI-compatible" in err, err
    assert len(posts) < 100 and elapsed < 20, (len(posts), elapsed)


def test_the_annotation_tools_keep_their_input_and_another_jobs_output(tmp_path, capsys):
    """--out that is the --input, and --out holding another step's rows: refused, nothing changed;
    --overwrite replaces the other job's rows."""
    from chat_server import ChatServer
    from rwkvclip_dist.descriptions.cli import main

    src = _samples(tmp_path / "in.jsonl", 4)
    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"key": "s000", "synthetic": "a dog", "model": "vlm", "prompt_version": "v1"}) + "\n")
    server = ChatServer().start()
    try:
        def run(out, *extra):
            return main(["--input", str(src), "--out", str(out), "--base-url", server.url, "--model", "test-model",
                         "--no-progress", *extra])

        before = snapshot(tmp_path)
        assert run(src) == 2
        assert f"--out {src}: is the input --input" in capsys.readouterr().err
        assert run(captions) == 2
        assert f"--out {captions}: holds the rows of another job" in capsys.readouterr().err
        assert snapshot(tmp_path) == before
        assert run(captions, "--overwrite") == 0
        rows = [json.loads(line) for line in captions.read_text().splitlines()]
        assert len(rows) == 4 and all("generated" in r and r["model"] == "test-model" for r in rows)
        assert run(captions) == 0  # the same job again: resumes, nothing to do
    finally:
        server.stop()


# -- s3:// streams are checked before anything is written -----------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({"S3_ENDPOINT_URL": "http://127.0.0.1:9"}, "data.streams: s3://shards/train: cannot reach http://127.0.0.1:9"),
    ({"AWS_ACCESS_KEY_ID": None}, "data.streams: s3://shards/train: no AWS credentials found in this environment"),
])
def test_s3_credentials_and_endpoint_are_checked_before_the_run_directory(tmp_path, monkeypatch, capsys, env,
                                                                          expected):
    """train.py's main in-process: exit 2, the one line, no run directory (nothing listens on port 9;
    HOME points at an empty folder so no ~/.aws is read)."""
    from conftest import DEMO_RECIPE
    from rwkvclip_dist.data.local_s3 import CREDENTIALS
    from rwkvclip_dist.train import main

    monkeypatch.setenv("HOME", str(tmp_path))
    for key, value in {**CREDENTIALS, "S3_ENDPOINT_URL": "http://127.0.0.1:9", **env}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as stop:
        main(["--recipe", DEMO_RECIPE, "--run-dir", str(tmp_path / "run"), "data.streams=[{remote: s3://shards/train}]",
              "eval.zeroshot=[]"])
    assert stop.value.code == 2
    assert one_line(capsys, "train.py").startswith(f"train.py: error: {expected}")
    assert not (tmp_path / "run").exists()


# -- small but visible: errors that named no option, a .pt for load_model ---------------------------

@pytest.mark.parametrize("tool, argv, expected", [
    ("evaluate", ["--model", "{m}/tiny.safetensors", "--task", "zeroshot", "--data", "{f}/pets", "--classnames",
                  "{t}/names.txt", "--output", "{t}/adir"], "--output {t}/adir: is a directory"),
    ("evaluate", ["--model", "{m}/tiny.safetensors", "--task", "zeroshot", "--data", "{f}/pets", "--classnames",
                  "{t}/adir", "--output", "{t}/r.json"], "--classnames {t}/adir: is a directory"),
    ("convert_checkpoint", ["to-authors", "{m}/tiny.safetensors", "{t}/adir"], "dst {t}/adir: is a directory"),
    ("convert_checkpoint", ["to-authors", "{m}/tiny.safetensors", "{t}/names.txt/x.pt"],
     "dst {t}/names.txt/x.pt: {t}/names.txt is a file, not a directory"),
    ("make_shards", ["--input", "{f}/pets", "--out", "{t}/names.txt", "--labels", "folder", "--workers", "1"],
     "--out {t}/names.txt: is a file"),
])
def test_a_path_of_the_wrong_kind_names_its_option(models, folders, tmp_path, capsys, tool, argv, expected):
    (tmp_path / "adir").mkdir()
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    before = snapshot(tmp_path)
    args = [a.format(m=models, f=folders, t=tmp_path) for a in argv]
    assert tool_main(tool)(args) == 2
    prog = f"{tool}.py"
    assert expected.format(t=tmp_path) in one_line(capsys, prog)
    assert snapshot(tmp_path) == before


def test_a_run_directory_that_is_a_file_names_it(demo_data, tmp_path, capsys):
    from conftest import DEMO_RECIPE
    from rwkvclip_dist.train import main

    (tmp_path / "run").write_text("not a folder\n")
    with pytest.raises(SystemExit) as stop:
        main(["--recipe", DEMO_RECIPE, "--run-dir", str(tmp_path / "run"), "eval.zeroshot=[]",
              f"data.streams=[{{remote: {demo_data / 'train'}}}]"])
    assert stop.value.code == 2
    assert f"--run-dir {tmp_path / 'run'}: is a file" in one_line(capsys, "train.py")
    assert (tmp_path / "run").read_text() == "not a folder\n"


def test_load_model_says_what_it_expects_of_a_pt(tmp_path):
    torch.save({"a": torch.zeros(2)}, tmp_path / "model_31.pt")
    with pytest.raises(ValueError, match=r"model_31\.pt: pretrained files are this project's \.safetensors.*"
                                         r"convert_checkpoint\.py from-authors"):
        load_model(None, tmp_path / "model_31.pt")


def test_every_json_the_project_writes_is_strict():
    """Every ``json.dump``/``json.dumps`` of the package and the tools refuses NaN (``allow_nan=False``)
    or goes through ``outputs.strict_json`` (NaN written as null): ``NaN`` is not JSON."""
    import ast

    from conftest import REPO

    loose = []
    for path in [*(REPO / "rwkvclip_dist").rglob("*.py"), *(REPO / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("dump", "dumps")
                    and getattr(node.func.value, "id", None) == "json"
                    and not any(k.arg == "allow_nan" for k in node.keywords)):
                loose.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not loose, "json.dump(s) without allow_nan=False (use rwkvclip_dist.outputs.strict_json):\n" + "\n".join(loose)
