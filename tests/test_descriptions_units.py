"""Unit tests of the description pipeline's parts: gates, sources, sharding, output recovery, prompt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rwkvclip_dist.descriptions.cli import parse_fields
from rwkvclip_dist.descriptions.client import ChatClient, ClientConfig
from rwkvclip_dist.descriptions.output import JsonlAppender, recover
from rwkvclip_dist.descriptions.prompt import load_prompt
from rwkvclip_dist.descriptions.quality import QualityConfig, clean, judge
from rwkvclip_dist.descriptions.sources import Sample, ShardSpec, count_samples, iter_samples

DOGS = Sample("k", raw="my dog rex IMG_1.jpg", synthetic="two brown dogs running on a beach", tags=("dog", "beach"))


@pytest.mark.parametrize(
    "answer, reason",
    [
        ("Two brown dogs run along a sandy beach.", None),
        ("Two brown puppies play on the beach.", None),  # same concept as the 'dog' tag
        ("A pair of animals on the sand by the sea.", None),  # general words are never judged
        ("Two dogs on a beach with no people around.", None),  # negated mention
        ("One of the dogs runs ahead on the beach.", None),  # 'one of' is not a count
        ("", "empty"),
        ("  ...  ", "empty"),
        ("I'm sorry, but I cannot describe images.", "refusal"),
        ("As an AI language model I can only guess: two dogs.", "refusal"),
        ("dog " * 76, "too_long"),
        ("Two dogs, photo from https://example.org/x", "web_noise"),
        ("Two dogs on a beach (IMG_1.jpg).", "web_noise"),
        ("Two dogs on a beach, yours for $20.", "web_noise"),
        ("Two dogs and a man on a beach.", "contradiction_object"),
        ("Three brown dogs on a beach.", "contradiction_count"),
        ("Two black dogs on a beach.", "contradiction_colour"),
    ],
)
def test_gates(answer, reason):
    assert judge(answer, DOGS).reason == reason


def test_length_gate_counts_the_text_towers_tokens():
    """The budget is the 77-token context less <start> and <end>: 75 BPE tokens pass and reach the
    tower whole; 76 would be truncated by the tokenizer, so they are rejected (then asked once more)."""
    import torch

    from rwkvclip_dist.data.tokenizer import CONTEXT_LENGTH, EOT_TOKEN, count_tokens, tokenize

    dogs = Sample("d", synthetic="dogs on a beach", tags=("dog",))
    fits, over = "dog " * 75, "dog " * 76
    assert judge(fits, dogs).ok and count_tokens(fits) == 75
    ids = tokenize(fits)[0]
    assert ids[CONTEXT_LENGTH - 1] == EOT_TOKEN and torch.equal(ids[1:76], tokenize("dog")[0][1].repeat(75))
    verdict = judge(over, dogs)
    assert (verdict.reason, verdict.detail) == ("too_long", "76 CLIP tokens > 75 (the text tower reads 77)")
    # 30 words that a word count would pass are 120 tokens, most of which the tower never sees.
    rare = "kaleidoscopically " * 30
    assert judge(rare, Sample("r", raw="pattern")).reason == "too_long"
    assert judge(fits, dogs, QualityConfig(max_text_tokens=74)).reason == "too_long"


def test_gate_rules_use_tags_and_absent_grounding():
    bus = Sample("b", synthetic="a red and white bus on a street", tags=("bus", "yellow"))
    assert judge("A red and white bus drives down the street.", bus).ok
    assert judge("A yellow bus on a street.", bus).ok, "a colour named by a tag is supported"
    assert judge("A blue bus on a street.", bus).reason == "contradiction_colour"
    raw_only = Sample("r", raw="our cat and two dogs")
    assert judge("A cat and two dogs.", raw_only).ok, "without caption or tags there is nothing to contradict"
    assert judge("Two dogs and a man.", DOGS, QualityConfig(check_grounding=False)).ok
    assert judge("A photo of two dogs that goes", DOGS, finish_reason="length").reason == "too_long"


def test_clean_strips_wrappers():
    assert clean('<think>the tags say dog</think>\n"Description: Two dogs on a beach."') == "Two dogs on a beach."
    assert clean("**Description:** Two dogs\non a beach.") == "Two dogs on a beach."
    assert clean("<think>still thinking when the cap hit") == ""


def test_jsonl_source(tmp_path):
    path = tmp_path / "in.jsonl"
    rows = [{"key": 7, "raw": "r", "synthetic": "s", "tags": "dog | beach, sand"}, {"key": "b", "tags": ["x"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    samples = list(iter_samples(path))
    assert samples == [Sample("7", "r", "s", ("dog", "beach", "sand")), Sample("b", "", "", ("x",))]
    assert count_samples(path) == 3
    path.write_text('{"key": "a"}\n{"raw": "no key"}\n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: missing field 'key'"):
        list(iter_samples(path))
    path.write_text('{"key": "a"}\n{"key": \n')
    with pytest.raises(ValueError, match=r"in.jsonl:2: not valid JSON"):
        list(iter_samples(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        iter_samples(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match=r"build MDS shards with tools/make_shards\.py first"):
        iter_samples(tmp_path / "corpus.parquet")


def test_field_names_are_configurable(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"id": "a", "text": "alt text", "ofa": "a dog", "ram": ["dog"]}) + "\n")
    fields = parse_fields(["key=id", "raw=text", "synthetic=ofa", "tags=ram"])
    assert list(iter_samples(path, fields)) == [Sample("a", "alt text", "a dog", ("dog",))]
    for bad in (["raw"], ["caption=x"], ["raw="]):
        with pytest.raises(ValueError, match="expected PART=NAME"):
            parse_fields(bad)


def test_mds_source_reads_text_columns(tmp_path):
    from streaming import MDSWriter

    columns = {"key": "str", "jpg": "bytes", "raw": "str", "synthetic": "str", "tags": "json"}
    with MDSWriter(out=str(tmp_path / "a"), columns=columns, size_limit=1 << 10) as writer:
        for i in range(6):
            writer.write({"key": f"k{i}", "jpg": b"\xff" * 300, "raw": f"r{i}", "synthetic": "", "tags": ["t", "u"]})
    samples = list(iter_samples(tmp_path / "a"))
    assert [s.key for s in samples] == [f"k{i}" for i in range(6)] and count_samples(tmp_path / "a") == 6
    assert samples[3] == Sample("k3", "r3", "", ("t", "u"))
    with MDSWriter(out=str(tmp_path / "b"), columns={"id": "str", "raw": "str"}) as writer:
        writer.write({"id": "x", "raw": "y"})
    with pytest.raises(ValueError, match=r"no column 'key' \(the sample key\); has \['id', 'raw'\]"):
        list(iter_samples(tmp_path / "b"))


def test_compressed_mds_source_is_read_in_place_leaving_no_copy(tmp_path, monkeypatch):
    """Compressed shards are decompressed in memory: no copy in the temporary folder while reading
    (what a killed job would leave behind) nor after, and the input directory is unchanged."""
    import tempfile

    from streaming import MDSWriter

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    columns = {"key": "str", "jpg": "bytes", "raw": "str"}
    with MDSWriter(out=str(tmp_path / "set"), columns=columns, compression="zstd", size_limit=1 << 10) as writer:
        for i in range(12):
            writer.write({"key": f"k{i}", "jpg": bytes([i]) * 300, "raw": f"r{i}"})
    before = sorted(p.name for p in (tmp_path / "set").iterdir())
    assert len(before) > 3 and all(name.endswith(".zstd") for name in before if name != "index.json")
    samples = iter_samples(tmp_path / "set", with_image=True)
    first = next(samples)
    assert list(scratch.iterdir()) == []  # mid-read
    rest = list(samples)
    assert [(s.key, s.raw, s.image) for s in [first, *rest]] == [(f"k{i}", f"r{i}", bytes([i]) * 300)
                                                                   for i in range(12)]
    assert list(scratch.iterdir()) == [] and sorted(p.name for p in (tmp_path / "set").iterdir()) == before


def test_shard_spec():
    keys = [f"key-{i}" for i in range(300)]
    parts = [ShardSpec.parse(f"{i}/4") for i in range(4)]
    owners = [[p.owns(k) for p in parts].count(True) for k in keys]
    assert owners == [1] * 300
    assert all(20 < sum(p.owns(k) for k in keys) < 130 for p in parts)
    # Pinned: resumed and added workers must split keys as earlier runs did, on any machine and
    # in any Python version, so the key -> worker map is a contract, not an implementation detail.
    pinned = {"s000": 0, "s001": 0, "img-42": 3, "000123456": 2, "c": 3, "d": 1}
    assert {k: next(i for i, p in enumerate(parts) if p.owns(k)) for k in pinned} == pinned
    for bad in ("4/4", "1-4", "0/0", "a/b"):
        with pytest.raises(ValueError, match="--shard"):
            ShardSpec.parse(bad)


def test_recover_repairs_torn_tail(tmp_path):
    out = tmp_path / "o.jsonl"
    assert recover(out) == set()
    with JsonlAppender(out) as appender:
        appender.write({"key": "a", "generated": "x"})
        appender.write({"key": "b", "generated": "y"})
    out.write_bytes(out.read_bytes() + b'{"key": "c", "gen')
    assert recover(out) == {"a", "b"}
    assert out.read_bytes().endswith(b'"y"}\n'), "the partial line is cut so appends start clean"
    out.write_bytes(out.read_bytes() + b'{"key": "c", "generated": "z"}')
    assert recover(out) == {"a", "b", "c"} and out.read_bytes().endswith(b'"z"}\n')


def test_output_lock_refuses_a_second_writer(tmp_path):
    out = tmp_path / "o.jsonl"
    with JsonlAppender(out, exclusive=True), pytest.raises(BlockingIOError, match=r"o\.jsonl is being written by"):
        JsonlAppender(out, exclusive=True)
    with JsonlAppender(out, exclusive=True) as appender:  # released on close
        appender.write({"key": "a"})
    assert recover(out) == {"a"}


def test_recover_rejects_damaged_files(tmp_path):
    out = tmp_path / "o.jsonl"
    out.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')
    with pytest.raises(ValueError, match=r"o.jsonl:2: not a description row"):
        recover(out)
    out.write_text('{"key": "a"}\n{"key": "a"}\n')
    with pytest.raises(ValueError, match=r"o.jsonl:2: key 'a' appears twice"):
        recover(out)


def test_prompt_template(tmp_path):
    prompt = load_prompt()
    assert prompt.version == "v2"
    text = prompt.render(Sample("k", raw="  holiday\n pic ", tags=("dog",)))
    assert text.endswith("Web text: holiday pic\nCaption: (none)\nTags: dog")
    assert text.startswith(prompt.instruction) and "{" not in text
    bad = tmp_path / "v9.txt"
    bad.write_text("Describe it.\nRaw: {raw}\n")
    with pytest.raises(ValueError, match=r"v9\.txt: no '%%' line"):
        load_prompt(bad)
    bad.write_text("Describe it.\n%%\nRaw: {raw} {caption} {url}\n")
    with pytest.raises(ValueError, match=r"exactly the placeholders \['caption', 'raw', 'tags'\], found"):
        load_prompt(bad)


def test_backoff_grows_with_jitter_and_honours_retry_after():
    client = ChatClient(ClientConfig(base_url="http://127.0.0.1:1", model="m", backoff_base_s=1.0, backoff_max_s=8.0))
    for attempt, cap in [(0, 1.0), (2, 4.0), (6, 8.0)]:
        delays = [client._backoff(attempt, None) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in delays) and len(set(delays)) > 1
    assert client._backoff(0, 5.0) == 5.0 and client._backoff(0, 60.0) == 8.0
    assert ClientConfig(base_url="http://h:8000", model="m").api_root == "http://h:8000/v1"
    assert ClientConfig(base_url="http://h:8000/v1/", model="m").api_root == "http://h:8000/v1"


def test_repo_prompt_files_are_all_loadable():
    prompts = sorted((Path(__file__).resolve().parents[1] / "rwkvclip_dist/descriptions/prompts").glob("*.txt"))
    assert prompts and all(load_prompt(p).version == p.stem for p in prompts)
