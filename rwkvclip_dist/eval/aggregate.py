"""Suite averages in DataComp's way, and the results table.

DataComp's ``aggregate_scores.py`` takes each task's ``main_metric`` (a fraction in [0, 1]), reports
ImageNet 1k alone, the plain mean over each group (ImageNet dist. shifts, VTAB, Retrieval) and the
plain mean over all tasks ("Average"). It refuses a results file without all 38 tasks; here a suite
with tasks missing is averaged over what ran and every figure is marked partial, with the count, so
a partial number can never pass for the published one.
"""

from __future__ import annotations

from statistics import fmean

from rwkvclip_dist.eval.suite import Suite, SuiteTask


def aggregate(suite: Suite, tasks: list[SuiteTask], scores: dict[str, float]) -> dict:
    """``scores`` maps task display names to main metrics. Returns
    ``{"Average": {"score", "n", "of", "partial"}, <group>: {...}, <headline task>: {...}}``."""
    out: dict[str, dict] = {}
    for name in suite.headline:
        if any(t.name == name for t in tasks):
            out[name] = _mean([name], scores)
    groups: dict[str, list[str]] = {}
    for task in tasks:
        for group in task.groups:
            groups.setdefault(group, []).append(task.name)
    for group, names in groups.items():
        out[group] = _mean(names, scores)
    out["Average"] = _mean([t.name for t in tasks], scores)
    return out


def _mean(names: list[str], scores: dict[str, float]) -> dict:
    have = [scores[n] for n in names if scores.get(n) is not None]
    return {"score": fmean(have) if have else None, "n": len(have), "of": len(names), "partial": len(have) < len(names)}


def markdown_table(suite: Suite, rows: list[dict], aggregates: dict) -> str:
    """One row per task (main metric, value, images, seconds) and one per average; a partial
    average reads e.g. ``0.4123 (partial: 36 of 38)``."""
    lines = [f"# {suite.name} suite", "", "| task | metric | value | images | seconds |", "|---|---|---|---|---|"]
    for row in rows:
        value = "missing" if row.get("missing") else _fmt(row["metrics"].get("main_metric"))
        n = row.get("metrics", {}).get("n", "")
        corrupt = row.get("metrics", {}).get("corrupt_images", 0)
        images = f"{n} ({corrupt} corrupt)" if corrupt else str(n)
        lines.append(f"| {row['dataset']} | {row['main_metric']} | {value} | {images} | {row.get('seconds', '')} |")
    lines += ["", "| average | value | tasks |", "|---|---|---|"]
    for name, agg in aggregates.items():
        value = _fmt(agg["score"]) + (f" (partial: {agg['n']} of {agg['of']})" if agg["partial"] else "")
        lines.append(f"| {name} | {value} | {agg['n']}/{agg['of']} |")
    return "\n".join(lines) + "\n"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"
