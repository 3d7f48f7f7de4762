"""Command lines of tools/generate_descriptions.py and, through the shared parts here, of
tools/generate_captions.py (caption_cli.py): server, run and offline options, and one way to end a
run (summary line; exit 0, 1 when every sample failed and nothing was ever written, 2 on an error that
stopped the run: ``cli.run_tool``'s one line, ``prog: error: ...``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from rwkvclip_dist.cli import run_tool
from rwkvclip_dist.descriptions.bookkeeping import RunConfig, RunStats
from rwkvclip_dist.descriptions.client import ClientConfig, ServerError
from rwkvclip_dist.descriptions.instruct import FORMATS, export_instruct
from rwkvclip_dist.descriptions.prompt import DEFAULT_PROMPT, load_prompt
from rwkvclip_dist.descriptions.quality import MAX_TEXT_TOKENS, QualityConfig
from rwkvclip_dist.descriptions.sources import ShardSpec, SourceFields
from rwkvclip_dist.descriptions.tasks import DescribeTask, Task

log = logging.getLogger("generate_descriptions")


def add_run_args(p: argparse.ArgumentParser, out_help: str, parts: str) -> None:
    """Input, output, sharding, server and offline options every step takes."""
    p.add_argument("--input", required=True, type=Path, help="JSONL file or MDS directory (with index.json)")
    p.add_argument("--out", required=True, type=Path, help=out_help)
    p.add_argument("--base-url", help="OpenAI-compatible server, e.g. http://localhost:8000/v1")
    p.add_argument("--model", required=True, help="served model name (or model path with --offline-vllm)")
    p.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    p.add_argument("--shard", type=ShardSpec.parse, default=ShardSpec(), help="i/n: this worker's share by key hash")
    p.add_argument("--api-key-env", help="environment variable holding the API key (never logged)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")
    p.add_argument("--max-retries", type=int, default=5, help="retries of a request on 429/5xx/timeouts (default 5)")
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=256, help="completion cap; cut answers are rejected")
    p.add_argument(
        "--field", action="append", default=[], metavar="PART=NAME",
        help=f"input field/column name for {parts}, e.g. --field raw=text",
    )  # fmt: skip
    p.add_argument(
        "--fsync-interval", type=float, default=RunConfig.fsync_interval_s, help="seconds between fsyncs (0: every row)"
    )
    p.add_argument("--offline-vllm", action="store_true", help="run vllm.LLM in-process instead of a server")
    p.add_argument("--batch-size", type=int, default=1024, help="prompts per vllm.LLM call (--offline-vllm)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (--offline-vllm)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an --out written by another job (other step, model or prompt); the same job resumes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(prog=p.prog)  # finish() names the tool in its error line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="generate_descriptions.py",
        description="Write LLM descriptions (SPEC section 8) for samples of a JSONL file or MDS dataset; "
        "resumable, shardable, output mergeable with tools/make_shards.py --captions.",
    )
    add_run_args(p, "output JSONL {key, generated, model, prompt_version}", "key, raw, synthetic or tags")
    p.add_argument(
        "--captions", action="append", default=[], type=Path, metavar="FILE.jsonl",
        help="join synthetic captions / tags per key from these JSONL files (e.g. generate_captions.py output)",
    )  # fmt: skip
    p.add_argument(
        "--max-text-tokens", type=int, default=MAX_TEXT_TOKENS,
        help=f"CLIP BPE tokens a description may have (default {MAX_TEXT_TOKENS}: the 77-token context)",
    )  # fmt: skip
    p.add_argument("--no-grounding-check", action="store_true", help="skip the object/count/colour gate")
    p.add_argument("--prompt", type=Path, default=DEFAULT_PROMPT, help="prompt template (its stem is the version)")
    p.add_argument("--export-instruct", type=Path, metavar="DIR", help="also write a LLaMA-Factory dataset here")
    p.add_argument("--format", choices=FORMATS, default="alpaca", help="--export-instruct layout")
    return p


def parse_fields(pairs: list[str]) -> SourceFields:
    names = {}
    for pair in pairs:
        part, sep, name = pair.partition("=")
        if not sep or part not in SourceFields.__dataclass_fields__ or not name:
            raise ValueError(
                f"--field {pair!r}: expected PART=NAME with PART one of {', '.join(SourceFields.__dataclass_fields__)}"
            )
        names[part] = name
    return SourceFields(**names)


def execute(args: argparse.Namespace, task: Task, joins: tuple[Path, ...] = ()) -> RunStats:
    """Run ``task`` over ``args.input`` on a server or, with --offline-vllm, in-process."""
    for flag, value in (("--concurrency", args.concurrency), ("--batch-size", args.batch_size)):
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    cfg = RunConfig(
        input=args.input, out=args.out, fields=parse_fields(args.field), shard=args.shard, joins=joins,
        fsync_interval_s=args.fsync_interval, progress=not args.no_progress, overwrite=args.overwrite,
    )  # fmt: skip
    if args.offline_vllm:
        from rwkvclip_dist.descriptions.offline import OfflineConfig, run_offline

        offline = OfflineConfig(
            model=args.model, batch_size=args.batch_size, temperature=args.temperature,
            max_tokens=args.max_tokens, tensor_parallel_size=args.tensor_parallel_size,
        )  # fmt: skip
        return run_offline(cfg, offline, task)
    if not args.base_url:
        raise ValueError("--base-url is required unless --offline-vllm is given")
    from rwkvclip_dist.descriptions.runner import run_online

    client = ClientConfig(
        base_url=args.base_url, model=args.model, api_key_env=args.api_key_env, concurrency=args.concurrency,
        timeout_s=args.timeout, max_retries=args.max_retries, temperature=args.temperature,
        max_tokens=args.max_tokens,
    )  # fmt: skip
    return run_online(cfg, client, task)


def finish(args: argparse.Namespace, work: Callable[[], RunStats], after: Callable[[], None] | None = None) -> int:
    """Run ``work`` with logging set up; print the summary; the exit status of the tool (errors that stop
    the run are raised, for :func:`run_tool`)."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    stats = work()
    log.info("summary: %s", stats.summary())
    # Nothing written, now or by an earlier run: the setup is wrong (a text-only model given images,
    # a prompt the server rejects), not the samples. A rerun whose last few keys fail again is fine.
    if stats.done == 0 and stats.failed and not stats.already_done:
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(stats.failed.items()))
        failures = args.out.with_name(args.out.stem + ".failures.jsonl")
        print(f"{args.prog}: error: every sample of this run failed ({reasons}); see {failures}", file=sys.stderr)
        return 1
    if after is not None:
        after()
    return 0


def run(args: argparse.Namespace) -> int:
    def work() -> RunStats:
        quality = QualityConfig(max_text_tokens=args.max_text_tokens, check_grounding=not args.no_grounding_check)
        return execute(args, DescribeTask.load(args.prompt, quality), tuple(args.captions))

    def export() -> None:
        if args.export_instruct:
            path, count = export_instruct(
                args.input, args.out, load_prompt(args.prompt), args.export_instruct, args.format,
                parse_fields(args.field),
            )  # fmt: skip
            log.info("wrote %d %s records to %s (registered in dataset_info.json)", count, args.format, path)

    return finish(args, work, export)


def main(argv: list[str] | None = None) -> int:
    # A server that refuses the run (unreachable, wrong model, bad key) is the user's to fix: one line.
    return run_tool(build_parser(), run, argv, extra=(ServerError,))
