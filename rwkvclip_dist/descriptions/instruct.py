"""Export (prompt, accepted description) pairs as a LLaMA-Factory instruction-tuning set.

The paper distilled answers of a large LLM and fine-tuned an open 8B model on them; this writes those
answers in the two layouts LLaMA-Factory reads, plus the dataset_info.json entry that registers them.
Alpaca rows split the prompt into ``instruction`` (fixed task) and ``input`` (the sample's sources);
LLaMA-Factory joins them with a newline, which is exactly the prompt the generator sends.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rwkvclip_dist.descriptions.prompt import PromptTemplate
from rwkvclip_dist.descriptions.sources import SourceFields, iter_samples

FORMATS = ("alpaca", "sharegpt")


def _accepted(out: Path, version: str) -> dict[str, str]:
    """key -> description for rows written with this prompt version (others had another prompt)."""
    rows: dict[str, str] = {}
    with out.open("r", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row["prompt_version"] == version:
                    rows[row["key"]] = row["generated"]
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"{out}:{line_no}: not a description row ({err})") from err
    return rows


def _record(fmt: str, prompt: PromptTemplate, source_block: str, answer: str) -> dict[str, Any]:
    if fmt == "alpaca":
        return {"instruction": prompt.instruction, "input": source_block, "output": answer}
    return {
        "conversations": [
            {"from": "human", "value": f"{prompt.instruction}\n{source_block}"},
            {"from": "gpt", "value": answer},
        ]
    }


def _dataset_info(fmt: str, file_name: str) -> dict[str, Any]:
    if fmt == "alpaca":
        return {"file_name": file_name, "columns": {"prompt": "instruction", "query": "input", "response": "output"}}
    return {
        "file_name": file_name,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
    }


def export_instruct(
    source: Path, out: Path, prompt: PromptTemplate, directory: Path, fmt: str, fields: SourceFields | None = None
) -> tuple[Path, int]:
    """Write ``directory/rwkvclip_descriptions_<fmt>.json`` and merge its entry into dataset_info.json.

    Returns the data file and its number of records.
    """
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {FORMATS}, got {fmt!r}")
    if not out.is_file():
        raise FileNotFoundError(f"{out}: no descriptions to export")
    answers = _accepted(out, prompt.version)
    directory.mkdir(parents=True, exist_ok=True)
    name = f"rwkvclip_descriptions_{fmt}"
    data_path = directory / f"{name}.json"
    count = 0
    # Streamed as a JSON array so a large distillation set never sits in memory twice.
    with data_path.open("w", encoding="utf-8") as handle:
        handle.write("[\n")
        for sample in iter_samples(source, fields or SourceFields()):
            answer = answers.pop(sample.key, None)
            if answer is None:
                continue
            handle.write(",\n" if count else "")
            handle.write(json.dumps(_record(fmt, prompt, prompt.render_input(sample), answer), ensure_ascii=False, allow_nan=False))
            count += 1
        handle.write("\n]\n")
    info_path = directory / "dataset_info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.exists() else {}
    info[name] = _dataset_info(fmt, data_path.name)
    info_path.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return data_path, count
