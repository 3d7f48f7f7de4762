"""End-to-end tests of description generation against a real HTTP server on 127.0.0.1.

The server (tests/chat_server.py) speaks the OpenAI chat-completions protocol and stands in
for vLLM, which needs a GPU and model weights and cannot run here; the client, retries, gates,
output files and CLI under test are the real ones.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from chat_server import ChatServer

from conftest import kill_once_written, read_rows
from rwkvclip_dist.descriptions.bookkeeping import RunConfig
from rwkvclip_dist.descriptions.cli import main
from rwkvclip_dist.descriptions.client import ClientConfig, ServerError
from rwkvclip_dist.descriptions.runner import run_online
from tool_loader import tool_main

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [
    ("two brown dogs running on a beach", ["dog", "beach", "sand"]),
    ("a red car parked on a street", ["car", "street", "red"]),
    ("a woman holding an umbrella in the rain", ["woman", "umbrella", "rain"]),
    ("three white sheep grazing in a field", ["sheep", "field", "grass"]),
]


def write_samples(path: Path, n: int) -> list[str]:
    keys = [f"s{i:03d}" for i in range(n)]
    with path.open("w") as handle:
        for i, key in enumerate(keys):
            caption, tags = CAPTIONS[i % len(CAPTIONS)]
            raw = f"IMG_{i}.jpg key={key} only $9.99 at shop.example.com"
            handle.write(json.dumps({"key": key, "raw": raw, "synthetic": caption, "tags": tags}) + "\n")
    return keys


@pytest.fixture
def server():
    started: list[ChatServer] = []

    def start(**kwargs) -> ChatServer:
        started.append(ChatServer(**kwargs).start())
        return started[-1]

    yield start
    for srv in started:
        srv.stop()


def cli_args(srv: ChatServer, src: Path, out: Path, *extra: str, progress: bool = False) -> list[str]:
    quiet = [] if progress else ["--no-progress"]
    return ["--input", str(src), "--out", str(out), "--base-url", srv.url, "--model", "test-model", *quiet, *extra]


def test_writes_every_key_once_with_bounded_concurrency(server, tmp_path):
    srv = server(delay_s=0.3)  # long enough that all slots fill before the first answer returns
    keys = write_samples(tmp_path / "in.jsonl", 24)
    out = tmp_path / "out.jsonl"
    assert main(cli_args(srv, tmp_path / "in.jsonl", out, "--concurrency", "6")) == 0
    rows = read_rows(out)
    assert sorted(r["key"] for r in rows) == keys
    assert all(set(r) == {"key", "generated", "model", "prompt_version"} for r in rows)
    assert {r["model"] for r in rows} == {"test-model"} and {r["prompt_version"] for r in rows} == {"v2"}
    by_key = {r["key"]: r["generated"] for r in rows}
    assert by_key["s001"] == "A photo of a red car parked on a street."
    assert srv.max_in_flight == 6
    # Resuming a finished run sends nothing and writes nothing.
    before = sum(srv.requests.values())
    assert main(cli_args(srv, tmp_path / "in.jsonl", out)) == 0
    assert sum(srv.requests.values()) == before and len(read_rows(out)) == 24


def _fast_config(srv: ChatServer, **kwargs) -> ClientConfig:
    return ClientConfig(base_url=srv.url + "/v1", model="test-model", backoff_base_s=0.01, **kwargs)


def test_transient_faults_are_retried_and_persistent_ones_recorded(server, tmp_path):
    srv = server(hang_s=1.0)
    write_samples(tmp_path / "in.jsonl", 8)
    srv.faults = {
        "s000": ["500", "503"], "s001": ["429"], "s002": ["malformed"], "s003": ["timeout"],
        "s004": ["drop"], "s005": ["500"] * 3,
    }  # fmt: skip
    cfg = RunConfig(input=tmp_path / "in.jsonl", out=tmp_path / "out.jsonl", progress=False)
    stats = run_online(cfg, _fast_config(srv, timeout_s=0.4, max_retries=2))
    written = {r["key"] for r in read_rows(cfg.out)}
    assert written == {f"s{i:03d}" for i in range(8)} - {"s005"}
    assert [srv.requests[k] for k in ("s000", "s001", "s002", "s003", "s004", "s005", "s006")] == [3, 2, 2, 2, 2, 3, 1]
    failures = read_rows(cfg.failures_path)
    assert [(f["key"], f["reason"]) for f in failures] == [("s005", "http_500")]
    assert stats.done == 7 and stats.retried == 6 and stats.failed == Counter({"http_500": 1})


def test_quality_gates_retry_once_then_record_failure(server, tmp_path):
    srv = server()
    write_samples(tmp_path / "in.jsonl", 8)
    srv.faults = {
        "s000": ["refusal"], "s001": ["empty", "empty"], "s002": ["long", "long"], "s003": ["cut", "cut"],
        "s004": ["contradict", "contradict"], "s005": ["url", "url"], "s006": ["contradict"],
    }  # fmt: skip
    cfg = RunConfig(input=tmp_path / "in.jsonl", out=tmp_path / "out.jsonl", progress=False)
    stats = run_online(cfg, _fast_config(srv))
    assert {r["key"] for r in read_rows(cfg.out)} == {"s000", "s006", "s007"}
    reasons = {f["key"]: f["reason"] for f in read_rows(cfg.failures_path)}
    assert reasons == {"s001": "empty", "s002": "too_long", "s003": "too_long",
                       "s004": "contradiction_object", "s005": "web_noise"}  # fmt: skip
    details = {f["key"]: f["detail"] for f in read_rows(cfg.failures_path)}
    assert details["s002"] == "160 CLIP tokens > 75 (the text tower reads 77)"
    assert all(srv.requests[k] == 2 for k in reasons) and srv.requests["s007"] == 1
    # The retry asks at the raised temperature so greedy decoding cannot repeat the rejected answer.
    assert srv.temperatures["s000"] == [0.2, 0.7]
    assert stats.retried == 7 and sum(stats.failed.values()) == 5


def test_kill_midway_then_resume_writes_each_key_exactly_once(server, tmp_path):
    srv = server(delay_s=0.05)
    keys = write_samples(tmp_path / "in.jsonl", 60)
    out = tmp_path / "out.jsonl"
    cmd = [
        sys.executable,
        str(REPO / "tools/generate_descriptions.py"),
        *cli_args(srv, tmp_path / "in.jsonl", out, "--concurrency", "2", progress=True),
    ]
    kill_once_written(cmd, out, 10)
    first = read_rows(out)
    assert 10 <= len(first) < 60, "the kill should land mid-run"
    # A kill during a write leaves a torn last line; make sure there is one to recover from.
    with out.open("ab") as handle:
        handle.write(b'{"key": "s0')
    srv.requests.clear()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    rows = read_rows(out)
    assert sorted(r["key"] for r in rows) == keys
    assert not set(srv.requests) & {r["key"] for r in first}, "finished keys must not be asked again"
    assert "desc/s" in done.stderr and f"skipped: already done {len(first)}" in done.stderr


def test_shards_split_keys_disjointly(server, tmp_path):
    srv = server()
    keys = write_samples(tmp_path / "in.jsonl", 30)
    seen: list[str] = []
    for i in range(3):
        out = tmp_path / f"out{i}.jsonl"
        assert main(cli_args(srv, tmp_path / "in.jsonl", out, "--shard", f"{i}/3")) == 0
        part = [r["key"] for r in read_rows(out)]
        assert 0 < len(part) < 30
        seen += part
    assert sorted(seen) == keys


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    write_samples(tmp_path / "in.jsonl", 2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before use: nothing listens there
    args = ["--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"),
            "--base-url", f"http://127.0.0.1:{port}", "--model", "m", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot reach the chat-completions server" in err and f"127.0.0.1:{port}/v1" in err
    args[1] = str(tmp_path / "typo.jsonl")
    assert main(args) == 2
    assert f"input {tmp_path / 'typo.jsonl'} does not exist" in capsys.readouterr().err, "input is checked first"


@pytest.mark.parametrize("tool", ["generate_descriptions", "generate_captions"])
def test_an_output_path_under_a_file_is_one_line(server, tmp_path, capsys, tool):
    """Once a traceback (FileExistsError from mkdir): every tool ends through ``cli.run_tool``."""
    srv = server()
    write_samples(tmp_path / "in.jsonl", 2)
    (tmp_path / "afile").write_text("")
    argv = cli_args(srv, tmp_path / "in.jsonl", tmp_path / "afile" / "o.jsonl")
    assert tool_main(tool)(argv + (["--step", "tags"] if tool == "generate_captions" else [])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{tool}.py: error: ") and "afile" in err[0], err


@pytest.mark.parametrize("list_models", [True, False])
def test_wrong_model_name_is_a_clear_error(server, tmp_path, capsys, list_models):
    srv = server(models=("qwen-8b", "llama-8b"), list_models=list_models)
    write_samples(tmp_path / "in.jsonl", 3)
    assert main(cli_args(srv, tmp_path / "in.jsonl", tmp_path / "o.jsonl")) == 2
    err = capsys.readouterr().err
    if list_models:
        assert "model 'test-model' is not served" in err and "qwen-8b, llama-8b" in err
    else:
        assert "does not know model 'test-model'" in err
    assert not (tmp_path / "o.jsonl").exists() or not read_rows(tmp_path / "o.jsonl")


def test_api_key_comes_from_env_and_is_never_logged(server, tmp_path, capsys, monkeypatch):
    secret = "sk-test-4d7f1e"
    srv = server(api_key=secret)
    write_samples(tmp_path / "in.jsonl", 3)
    monkeypatch.setenv("DESC_KEY", secret)
    out = tmp_path / "out.jsonl"
    assert main(cli_args(srv, tmp_path / "in.jsonl", out, "--api-key-env", "DESC_KEY", "-v")) == 0
    assert len(read_rows(out)) == 3 and set(srv.auth_headers) == {f"Bearer {secret}"}
    monkeypatch.setenv("DESC_KEY", "sk-wrong-key")
    assert main(cli_args(srv, tmp_path / "in.jsonl", tmp_path / "o2.jsonl", "--api-key-env", "DESC_KEY")) == 2
    monkeypatch.delenv("DESC_KEY")
    assert main(cli_args(srv, tmp_path / "in.jsonl", tmp_path / "o3.jsonl", "--api-key-env", "DESC_KEY")) == 2
    captured = capsys.readouterr()
    assert "refused the API key" in captured.err
    assert "--api-key-env DESC_KEY: that environment variable is empty or unset" in captured.err
    for text in (captured.out, captured.err, out.read_text()):
        assert secret not in text and "sk-wrong-key" not in text


def test_outage_mid_run_stops_with_an_error(server, tmp_path):
    srv = server()
    write_samples(tmp_path / "in.jsonl", 40)
    srv.faults = {f"s{i:03d}": ["drop"] for i in range(40)}
    cfg = RunConfig(input=tmp_path / "in.jsonl", out=tmp_path / "out.jsonl", progress=False)
    with pytest.raises(ServerError, match="stopped answering"):
        run_online(cfg, _fast_config(srv, concurrency=2, max_retries=0))
    assert sum(srv.requests.values()) < 40, "the run should stop before burning through the corpus"


def test_export_instruct_writes_llama_factory_sets(server, tmp_path):
    srv = server()
    write_samples(tmp_path / "in.jsonl", 5)
    # Failed keys are asked again by every rerun, so s004 fails in both runs below.
    srv.faults = {"s004": ["empty"] * 4}
    out = tmp_path / "out.jsonl"
    for fmt in ("alpaca", "sharegpt"):
        args = cli_args(srv, tmp_path / "in.jsonl", out, "--export-instruct", str(tmp_path / "lf"), "--format", fmt)
        assert main(args) == 0
    alpaca = json.loads((tmp_path / "lf/rwkvclip_descriptions_alpaca.json").read_text())
    sharegpt = json.loads((tmp_path / "lf/rwkvclip_descriptions_sharegpt.json").read_text())
    assert len(alpaca) == len(sharegpt) == 4, "the failed sample has no answer to distil"
    assert srv.requests["s004"] == 4 and srv.requests["s000"] == 1
    assert set(alpaca[0]) == {"instruction", "input", "output"}
    assert alpaca[1]["input"].splitlines()[1] == "Caption: a red car parked on a street"
    assert alpaca[1]["output"] == "A photo of a red car parked on a street."
    turns = sharegpt[1]["conversations"]
    assert [t["from"] for t in turns] == ["human", "gpt"]
    assert turns[0]["value"] == f"{alpaca[1]['instruction']}\n{alpaca[1]['input']}"
    info = json.loads((tmp_path / "lf/dataset_info.json").read_text())
    assert info["rwkvclip_descriptions_alpaca"]["file_name"] == "rwkvclip_descriptions_alpaca.json"
    assert info["rwkvclip_descriptions_sharegpt"]["formatting"] == "sharegpt"
    assert info["rwkvclip_descriptions_sharegpt"]["tags"]["user_tag"] == "human"


def test_offline_vllm_without_vllm_is_a_clear_error(tmp_path, capsys):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("vllm is installed here; this test covers the machine without it")
    write_samples(tmp_path / "in.jsonl", 2)
    args = ["--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "o.jsonl"), "--model", "m",
            "--offline-vllm", "--no-progress"]  # fmt: skip
    assert main(args) == 2
    assert "--offline-vllm needs the 'vllm' package" in capsys.readouterr().err
