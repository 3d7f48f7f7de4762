"""Command line of tools/generate_descriptions.py."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rwkvclip_dist.descriptions.bookkeeping import RunConfig, RunStats
from rwkvclip_dist.descriptions.client import ClientConfig, ServerError
from rwkvclip_dist.descriptions.instruct import FORMATS, export_instruct
from rwkvclip_dist.descriptions.prompt import DEFAULT_PROMPT, load_prompt
from rwkvclip_dist.descriptions.quality import QualityConfig
from rwkvclip_dist.descriptions.sources import ShardSpec, SourceFields

log = logging.getLogger("generate_descriptions")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_descriptions.py",
        description="Write LLM descriptions (SPEC section 8) for samples of a JSONL file or MDS dataset; "
        "resumable, shardable, output mergeable with tools/make_shards.py --captions.",
    )
    p.add_argument("--input", required=True, type=Path, help="JSONL file or MDS directory (with index.json)")
    p.add_argument("--out", required=True, type=Path, help="output JSONL {key, generated, model, prompt_version}")
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--model", required=True, help="served model name (or model path with --offline-vllm)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    p.add_argument("--shard", type=ShardSpec.parse, default=ShardSpec(), help="i/n: this worker's share by key hash")
    p.add_argument("--api-key-env", help="environment variable holding the API key (never logged)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--max-retries", type=int, default=5, help="retries of a request on 429/5xx/timeouts (default 5)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=256, help="completion cap; cut answers are rejected")
    p.add_argument("--max-words", type=int, default=QualityConfig.max_words, help="longer answers are rejected")
    p.add_argument("--no-grounding-check", action="store_true", help="skip the object/count/colour gate")
    p.add_argument("--prompt", type=Path, default=DEFAULT_PROMPT, help="prompt template (its stem is the version)")
    p.add_argument(
        "--field", action="append", default=[], metavar="PART=NAME",
        help="input field/column name for key, raw, synthetic or tags, e.g. --field raw=text",
    )  # fmt: skip
    p.add_argument(
        "--fsync-interval", type=float, default=RunConfig.fsync_interval_s, help="seconds between fsyncs (0: every row)"
    )
    p.add_argument("--export-instruct", type=Path, metavar="DIR", help="also write a LLaMA-Factory dataset here")
    p.add_argument("--format", choices=FORMATS, default="alpaca", help="--export-instruct layout")
    p.add_argument("--offline-vllm", action="store_true", help="run vllm.LLM in-process instead of a server")
    p.add_argument("--batch-size", type=int, default=1024, help="prompts per vllm.LLM call (--offline-vllm)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (--offline-vllm)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def parse_fields(pairs: list[str]) -> SourceFields:
    names = {}
    for pair in pairs:
        part, sep, name = pair.partition("=")
        if not sep or part not in SourceFields.__dataclass_fields__ or not name:
            raise ValueError(f"--field {pair!r}: expected PART=NAME with PART one of key, raw, synthetic, tags")
        names[part] = name
    return SourceFields(**names)


def run(args: argparse.Namespace) -> RunStats:
    for flag, value in (("--concurrency", args.concurrency), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    cfg = RunConfig(
        input=args.input,
        out=args.out,
        fields=parse_fields(args.field),
        shard=args.shard,
        prompt_path=args.prompt,
        quality=QualityConfig(max_words=args.max_words, check_grounding=not args.no_grounding_check),
        fsync_interval_s=args.fsync_interval,
        progress=not args.no_progress,
    )
    if args.offline_vllm:
        from rwkvclip_dist.descriptions.offline import OfflineConfig, run_offline

        offline = OfflineConfig(
            model=args.model, batch_size=args.batch_size, temperature=args.temperature,
            max_tokens=args.max_tokens, tensor_parallel_size=args.tensor_parallel_size,
        )  # fmt: skip
        return run_offline(cfg, offline)
    if not args.base_url:
        raise ValueError("--base-url is required unless --offline-vllm is given")
    from rwkvclip_dist.descriptions.runner import run_online

    client = ClientConfig(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        timeout_s=args.timeout, max_retries=args.max_retries, temperature=args.temperature,
        max_tokens=args.max_tokens,
    )  # fmt: skip
    return run_online(cfg, client)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    try:
        stats = run(args)
        log.info("summary: %s", stats.summary())
        if args.export_instruct:
            path, count = export_instruct(
                args.input,
                args.out,
                load_prompt(args.prompt),
                args.export_instruct,
                args.format,
                parse_fields(args.field),
            )
            log.info("wrote %d %s records to %s (registered in dataset_info.json)", count, args.format, path)
    except (ServerError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
