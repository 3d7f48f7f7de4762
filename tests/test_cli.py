"""Wrong inputs to every command-line tool and to the trainer end in one line that names the file,
key or argument and what is wrong, with exit status 2 and no Python traceback (``--debug`` shows it)."""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import DEMO_RECIPE, PYTHON, REPO, TRAIN, dist_env, torchrun_cmd
from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.pretrained import load_model, save_pretrained
from tool_loader import tool_main

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    good = save_pretrained(load_model("tiny"), root / "tiny.safetensors")
    whole = good.read_bytes()
    (root / "truncated.safetensors").write_bytes(whole[: len(whole) // 2])  # no sidecar: the header is read
    torch.save({"a": torch.zeros(3)}, root / "ok.pt")
    (root / "truncated.pt").write_bytes((root / "ok.pt").read_bytes()[:100])
    (root / "bad.json").write_text("{not json")
    (root / "empty").mkdir()
    return {"root": root, "good": good}


def _one_line_error(tool: str, capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"{tool}.py: error: ") and "Traceback" not in err[0], err[0]
    return err[0]


@pytest.mark.parametrize("tool, argv, fragment", [
    ("evaluate", ["--model", "{root}/missing.safetensors", "--task", "zeroshot", "--data", "{root}/empty"],
     "pretrained file {root}/missing.safetensors does not exist"),
    ("evaluate", ["--model", "{root}/truncated.safetensors", "--task", "zeroshot", "--data", "{root}/empty"],
     "{root}/truncated.safetensors: not a readable .safetensors file"),
    ("evaluate", ["--model", "tinyy", "--task", "zeroshot", "--data", "{root}/empty"], "unknown model 'tinyy'"),
    ("evaluate", ["--model", "{root}/ok.pt", "--task", "zeroshot", "--data", "{root}/empty"],
     "pretrained files are .safetensors"),
    ("evaluate", ["--model", "tiny", "--task", "zeroshot", "--data", "{root}/nowhere"], "--data {root}/nowhere"),
    ("evaluate", ["--model", "tiny", "--task", "zeroshot"], "--task zeroshot needs --data"),
    ("evaluate", ["--model", "tiny", "--task", "zeroshot", "--data", "{root}/empty", "--templates", "imagenett"],
     "no template set 'imagenett'"),
    ("evaluate", ["--model", "tiny", "--task", "zeroshot", "--data", "{root}/empty", "--templates", "{root}/bad.json"],
     "{root}/bad.json: invalid JSON"),
    ("evaluate", ["--model", "tiny", "--task", "retrieval", "--annotations", "{root}/bad.json", "--image-root",
                  "{root}/empty"], "{root}/bad.json: invalid JSON"),
    ("evaluate", ["--model", "tiny", "--task", "zeroshot", "--data", "{root}/empty", "--device", "gpu"],
     "--device 'gpu'"),
    ("convert_checkpoint", ["to-authors", "{root}/truncated.safetensors", "{root}/o.pt"],
     "{root}/truncated.safetensors: not a readable .safetensors file"),
    ("convert_checkpoint", ["from-authors", "{root}/missing.pt", "{root}/o.safetensors"], "{root}/missing.pt"),
    ("convert_checkpoint", ["from-authors", "{root}/truncated.pt", "{root}/o.safetensors"],
     "{root}/truncated.pt: not a readable torch checkpoint"),
    ("convert_checkpoint", ["from-authors", "{good}", "{root}/o.safetensors", "--model", "tinyy"], "unknown model"),
    ("convert_checkpoint", ["from-zero", "{root}/nowhere", "{root}/o.safetensors"], "{root}/nowhere does not exist"),
    ("convert_checkpoint", ["from-zero", "{root}/empty", "{root}/o.safetensors"], "no 'latest' file"),
    ("convert_checkpoint", ["from-zero", "{root}/empty", "{root}/o.safetensors", "--tag", "step_00000400"],
     "has no checkpoint 'step_00000400'"),
    ("export_vision_encoder", ["{root}/truncated.safetensors", "{root}/v.safetensors"],
     "{root}/truncated.safetensors: not a readable .safetensors file"),
    ("export_vision_encoder", ["{root}/missing.safetensors", "{root}/v.safetensors"], "does not exist"),
    ("export_vision_encoder", ["{good}", "{root}/v.bin"], "must end in .safetensors"),
])
def test_a_bad_input_is_one_line_and_exit_status_2(files, capsys, monkeypatch, tool, argv, fragment):
    monkeypatch.setenv("RWKVCLIP_NO_PROGRESS", "1")
    fill = {"root": files["root"], "good": files["good"]}
    assert tool_main(tool)([a.format(**fill) for a in argv]) == 2
    assert fragment.format(**fill) in _one_line_error(tool, capsys)


@pytest.mark.parametrize("tool, argv, fragment", [
    ("convert_checkpoint", ["from-authors", "a.pt", "b.safetensors", "--overrides", "{bad"], "--overrides: not JSON"),
    ("convert_checkpoint", ["from-authors", "a.pt", "b.safetensors", "--overrides", "[1]"], "a JSON object"),
    ("convert_checkpoint", ["from-authors", "a.pt", "b.safetensors", "--dtype", "fp8"], "--dtype: invalid choice"),
    ("export_vision_encoder", ["a.safetensors", "b.safetensors", "--dtype", "half"], "--dtype: invalid choice"),
    ("evaluate", ["--model", "tiny", "--task", "zeroshot", "--batch-size", "0"], "--batch-size: must be >= 1"),
    ("evaluate", ["--model", "tiny", "--task", "zeroshot", "--workers", "-1"], "--workers: must be >= 0"),
    ("make_shards", ["--input", "x.tar", "--out", "o", "--size-limit", "-5"], "--size-limit: must be >= 1"),
    ("make_shards", ["--input", "x.tar", "--out", "o", "--workers", "0"], "--workers: must be >= 1"),
])
def test_a_bad_argument_is_argparses_error(capsys, tool, argv, fragment):
    with pytest.raises(SystemExit) as stop:
        tool_main(tool)(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err.splitlines()[-1] and "Traceback" not in err


def test_make_shards_output_that_is_a_file_is_one_line(files, capsys):
    """Once a traceback (NotADirectoryError), and nothing may be written over the file."""
    (files["root"] / "afile").write_text("keep")
    argv = ["--input", str(files["root"] / "empty"), "--out", str(files["root"] / "afile")]
    assert tool_main("make_shards")(argv) == 2
    assert "afile: is a file; give the path of a directory" in _one_line_error("make_shards", capsys)
    assert (files["root"] / "afile").read_text() == "keep"


def test_options_and_positionals_intermixed(tmp_path):
    """Issue 21: ``train.py --recipe R a.b=1 --run-dir D c.d=2`` (overrides on both sides of an option)."""
    from rwkvclip_dist.train import parse_args

    args = parse_args(["--recipe", "r.yaml", "a.b=1", "--run-dir", str(tmp_path), "c.d=2", "--debug", "e=3"])
    assert args.overrides == ["a.b=1", "c.d=2", "e=3"] and args.run_dir == str(tmp_path) and args.debug
    seen = {}
    parser = argparse.ArgumentParser(prog="t.py")
    parser.add_argument("--flag")
    parser.add_argument("items", nargs="*")
    assert run_tool(parser, lambda a: seen.update(vars(a)), ["x", "--flag", "f", "--debug", "y"]) == 0
    assert seen["items"] == ["x", "y"] and seen["flag"] == "f"


def test_debug_shows_the_traceback(files):
    argv = ["to-authors", str(files["root"] / "truncated.safetensors"), str(files["root"] / "o.pt")]
    with pytest.raises(ValueError, match="not a readable .safetensors file"):
        tool_main("convert_checkpoint")([*argv, "--debug"])


def test_run_tool_catches_only_user_mistakes(capsys):
    def parser():
        return argparse.ArgumentParser(prog="t.py")

    def fail(kind):
        def run(args):
            raise kind("x.json: line 3: something is wrong\n  detail one")
        return run

    assert run_tool(parser(), fail(FileNotFoundError), []) == 2
    assert capsys.readouterr().err == "t.py: error: x.json: line 3: something is wrong\n  detail one\n"
    with pytest.raises(KeyError):  # a bug, not a user's mistake: the traceback stays
        run_tool(parser(), fail(KeyError), [])
    assert run_tool(parser(), lambda args: None, []) == 0


def test_model_table_help_prints_help():
    proc = subprocess.run([PYTHON, str(REPO / "tools" / "model_table.py"), "--help"], capture_output=True, text=True,
                          timeout=120, env=dist_env())
    assert proc.returncode == 0 and proc.stdout.startswith("usage: model_table.py") and "| model |" not in proc.stdout


def _no_traceback_from_us(output: str) -> None:
    assert "rwkvclip_dist/" not in "".join(line for line in output.splitlines() if line.lstrip().startswith("File "))


def test_trainer_bad_recipe_single_process(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {DEMO_RECIPE}\ndata: {{num_workers: -1}}\n")
    proc = subprocess.run([PYTHON, TRAIN, "--recipe", str(bad), "--run-dir", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=200, env=dist_env())
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"train.py: error: recipe {bad}: data.num_workers: must be >= 0, got -1"
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trainer_bad_recipe_fails_on_every_rank_before_the_process_group(tmp_path):
    """torchrun with 2 ranks: each rank prints the one line and exits 2 before init_distributed (no
    DeepSpeed or process-group output, no run directory, no traceback of ours; torchrun's own summary
    of the failed children is not ours to change)."""
    # torchrun stops the other ranks as soon as it sees one fail; polling every 5 s (not 0.1 s) lets the
    # slower rank reach its own error first, as it would on a cluster where ranks start apart anyway.
    cmd = torchrun_cmd(2, "--monitor-interval=5", TRAIN, "--recipe", DEMO_RECIPE, "--run-dir", str(tmp_path / "run"),
                       "optimizer.lr=-1")
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=dist_env())
    elapsed = time.monotonic() - start
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert output.count("train.py: error: command line: optimizer.lr: must be > 0, got -1.0") == 2, output
    assert "exitcode  : 2" in output and "DeepSpeed" not in output and "deepspeed" not in output.lower()
    _no_traceback_from_us(output)
    assert not (tmp_path / "run").exists()
    print(f"2-rank bad-recipe failure took {elapsed:.1f} s")
