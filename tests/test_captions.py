"""The synthetic-caption and tag steps (tools/generate_captions.py) end to end.

vLLM serving a vision-language model cannot run here (GPU and weights), so a real aiohttp server on
127.0.0.1 (tests/chat_server.py's ChatServer) stands in: it decodes the base64 image of each request,
identifies the sample by the SHA-256 of the bytes and keeps them, so the tests check that the actual
image bytes of every sample reached the server. Client, gates, output files and CLI are the real ones.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from chat_server import ChatServer
from PIL import Image

from conftest import caption_corpus, kill_once_written, make_shards, read_rows
from rwkvclip_dist.descriptions.caption_cli import main
from rwkvclip_dist.descriptions.cli import main as describe_main

REPO = Path(__file__).resolve().parents[1]
TAGS = {"m00": "Car, street, red", "m01": "- dog\n- beach\n- Dog", "m02": "tags: woman, umbrella, rain."}


@pytest.fixture
def server():
    srv = ChatServer().start()
    yield srv
    srv.stop()


def _know_images(srv: ChatServer, images: dict[str, bytes], answers: dict[str, str]) -> None:
    srv.images = {hashlib.sha256(data).hexdigest(): key for key, data in images.items()}
    srv.vision_answers = answers


def _args(srv: ChatServer, step: str, src: Path, out: Path, *extra: str, progress: bool = False) -> list[str]:
    return ["--step", step, "--input", str(src), "--out", str(out), "--base-url", srv.url, "--model", "test-model",
            *([] if progress else ["--no-progress"]), *extra]  # fmt: skip


def test_caption_tag_and_description_steps_fill_the_shards(server, tmp_path):
    """The paper's pipeline on an MDS set built by make_shards: caption and tag steps read the stored
    JPEGs, the description step joins their outputs, make_shards --captions merges all three."""
    from streaming import StreamingDataset

    csv = caption_corpus(tmp_path, 3)
    assert make_shards(["--input", str(csv), "--out", str(tmp_path / "plain"), "--workers", "1"]) == 0
    images = {f"m{i:02d}": (tmp_path / "img" / f"{i}.jpg").read_bytes() for i in range(3)}
    captions = {"m00": "A red car parked on a street.", "m01": "Two brown dogs running on a beach.",
                "m02": "A woman holding an umbrella in the rain."}  # fmt: skip
    _know_images(server, images, captions)
    assert main(_args(server, "caption", tmp_path / "plain", tmp_path / "cap.jsonl", "--concurrency", "2")) == 0
    assert server.received_images == images, "the server got the stored JPEG bytes of every sample"
    rows = {r["key"]: r for r in read_rows(tmp_path / "cap.jsonl")}
    assert rows["m01"] == {"key": "m01", "synthetic": captions["m01"], "model": "test-model", "prompt_version": "v1"}
    assert server.instructions[0].startswith("Write a caption for this photograph")

    server.received_images.clear()
    server.vision_answers = TAGS
    assert main(_args(server, "tags", tmp_path / "plain", tmp_path / "tags.jsonl")) == 0
    assert server.received_images == images
    tags = {r["key"]: r["tags"] for r in read_rows(tmp_path / "tags.jsonl")}
    assert tags == {"m00": ["car", "street", "red"], "m01": ["dog", "beach"], "m02": ["woman", "umbrella", "rain"]}

    # The description step joins both files by key: the prompt carries the new caption and tags.
    desc = tmp_path / "desc.jsonl"
    args = ["--input", str(tmp_path / "plain"), "--out", str(desc), "--base-url", server.url, "--model", "test-model",
            "--no-progress", "--captions", str(tmp_path / "cap.jsonl"), "--captions", str(tmp_path / "tags.jsonl")]
    assert describe_main(args) == 0
    generated = {r["key"]: r["generated"] for r in read_rows(desc)}
    assert generated["m01"] == "A photo of Two brown dogs running on a beach.."

    merged_args = ["--input", str(csv), "--out", str(tmp_path / "merged"), "--workers", "1"]
    for path in ("cap.jsonl", "tags.jsonl", "desc.jsonl"):
        merged_args += ["--captions", str(tmp_path / path)]
    assert make_shards(merged_args) == 0
    merged = {row["key"]: row for row in StreamingDataset(local=str(tmp_path / "merged"), batch_size=1)}
    assert merged["m01"]["synthetic"] == captions["m01"] and merged["m01"]["tags"] == ["dog", "beach"]
    assert merged["m02"]["generated"] == generated["m02"] and merged["m02"]["raw"] == "holiday pic key=m02"


def _jsonl_with_images(tmp_path: Path, n: int) -> tuple[Path, dict[str, bytes]]:
    (tmp_path / "img").mkdir()
    images, lines = {}, []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (20 * i % 255, 80, 40)).save(buf, format="PNG" if i % 2 else "JPEG")
        name = f"img/{i}.{'png' if i % 2 else 'jpg'}"
        (tmp_path / name).write_bytes(buf.getvalue())
        images[f"k{i:03d}"] = buf.getvalue()
        lines.append(json.dumps({"key": f"k{i:03d}", "image_path": name}))
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return src, images


def test_gates_missing_images_and_retries(server, tmp_path):
    src, images = _jsonl_with_images(tmp_path, 6)
    with src.open("a") as handle:  # two rows without a usable image: recorded, never sent
        handle.write(json.dumps({"key": "gone", "image_path": "img/missing.jpg"}) + "\n")
        (tmp_path / "img/notes.jpg").write_text("not an image")
        handle.write(json.dumps({"key": "text", "image_path": "img/notes.jpg"}) + "\n")
    _know_images(server, images, {k: f"A small square tile number {k[-1]}." for k in images})
    server.faults = {"k000": ["long"], "k001": ["long", "long"], "k002": ["refusal", "refusal"], "k003": ["500"]}
    out = tmp_path / "cap.jsonl"
    assert main(_args(server, "caption", src, out, "--max-retries", "1")) == 0
    assert {r["key"] for r in read_rows(out)} == {"k000", "k003", "k004", "k005"}
    failures = {f["key"]: (f["reason"], f["detail"]) for f in read_rows(tmp_path / "cap.failures.jsonl")}
    assert {k: reason for k, (reason, _) in failures.items()} == {
        "k001": "too_long", "k002": "refusal", "gone": "no_image", "text": "bad_image"}  # fmt: skip
    assert failures["k001"][1] == "160 CLIP tokens > 75 (the text tower reads 77)"
    assert "gone" not in server.requests and "text" not in server.requests
    assert server.requests["k000"] == 2 and server.requests["k003"] == 2
    assert server.received_images["k001"] == images["k001"], "PNG sent as it is"

    # Tags: a prose answer is not a tag list.
    server.faults = {"k000": ["long", "long"]}
    server.vision_answers = {k: "tile, square, green" for k in images}
    assert main(_args(server, "tags", src, tmp_path / "tags.jsonl", "--max-tags", "2")) == 0
    tag_rows = {r["key"]: r["tags"] for r in read_rows(tmp_path / "tags.jsonl")}
    assert tag_rows["k005"] == ["tile", "square"] and "k000" not in tag_rows
    reasons = {f["key"]: f["reason"] for f in read_rows(tmp_path / "tags.failures.jsonl")}
    assert reasons["k000"] == "not_a_tag_list"


def test_every_request_failing_exits_non_zero_with_one_line(server, tmp_path, capsys):
    src, images = _jsonl_with_images(tmp_path, 3)
    _know_images(server, {}, {})  # the server decodes none of the images: HTTP 400 for every request
    assert main(_args(server, "caption", src, tmp_path / "cap.jsonl")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"generate_captions.py: error: every sample of this run failed (http_400=3); see {tmp_path / 'cap.failures.jsonl'}"]
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain/index.json").write_text(json.dumps({"version": 2, "shards": [{"format": "mds",
        "column_names": ["key", "raw"], "column_encodings": ["str", "str"], "column_sizes": [None, None],
        "compression": None, "hashes": [], "raw_data": {"basename": "s.mds", "bytes": 0, "hashes": {}},
        "samples": 0, "size_limit": 1 << 20, "version": 2, "zip_data": None}]}))  # fmt: skip
    (tmp_path / "plain/s.mds").write_bytes(b"")
    assert main(_args(server, "tags", tmp_path / "plain", tmp_path / "t.jsonl")) == 2
    assert "no image column 'jpg'" in capsys.readouterr().err


def test_kill_midway_then_resume_writes_each_key_exactly_once(tmp_path):
    srv = ChatServer(delay_s=0.05).start()
    try:
        src, images = _jsonl_with_images(tmp_path, 40)
        _know_images(srv, images, {k: "a small square tile" for k in images})
        out = tmp_path / "cap.jsonl"
        cmd = [sys.executable, str(REPO / "tools/generate_captions.py"),
               *_args(srv, "caption", src, out, "--concurrency", "2", progress=True)]
        kill_once_written(cmd, out, 8)
        first = read_rows(out)
        assert 8 <= len(first) < 40, "the kill should land mid-run"
        with out.open("ab") as handle:
            handle.write(b'{"key": "k0')  # the torn line a kill during a write leaves
        srv.requests.clear()
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    finally:
        srv.stop()
    assert done.returncode == 0, done.stderr
    assert sorted(r["key"] for r in read_rows(out)) == sorted(images)
    assert not set(srv.requests) & {r["key"] for r in first}, "finished keys must not be asked again"
    assert "captions/s" in done.stderr and f"skipped: already done {len(first)}" in done.stderr


def test_tag_parsing_image_types_and_prompt_files(tmp_path):
    from rwkvclip_dist.descriptions.captions import image_type, load_instruction, load_task
    from rwkvclip_dist.descriptions.sources import Sample

    tags = load_task("tags")
    sample = Sample("k")
    for answer, expected in [
        ("Dog, beach, sand", ["dog", "beach", "sand"]),
        ("<think>a dog</think>Tags: 1. dog\n2. golden retriever\n3) Beach.", ["dog", "golden retriever", "beach"]),
        ("* dog; * \"sand\" | sea", ["dog", "sand", "sea"]),
    ]:
        assert tags.judge(answer, sample, "stop").result == expected
    assert tags.judge("A dog is running along the sandy beach today", sample, "stop").reason == "not_a_tag_list"
    assert tags.judge(" , ;", sample, "stop").reason == "empty"
    assert tags.judge("dog, beach, s", sample, "length").reason == "too_long"
    assert tags.judge("I'm sorry, I cannot see images", sample, "stop").reason == "refusal"
    assert image_type(b"RIFF\0\0\0\0WEBPVP8 ") == "image/webp" and image_type(b"BM") is None
    assert load_task("caption").version == "v1" and "{" not in load_task("caption").instruction
    bad = tmp_path / "v9.txt"
    bad.write_text("# only a comment\n")
    with pytest.raises(ValueError, match=r"v9\.txt: no instruction"):
        load_instruction(bad)
    bad.write_text("Caption {raw}\n")
    with pytest.raises(ValueError, match="take no placeholders"):
        load_instruction(bad)
    with pytest.raises(ValueError, match="unknown step 'ocr'"):
        load_task("ocr")
