"""results.json (machine-readable) and BENCHMARKS.md (the same figures for people) from one run."""
from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any, Mapping, Optional, Sequence

from benchmarks.measure import VariantResult, ratio
from benchmarks.workload import (
    HOST_PAGE_IMAGES,
    HOST_PAGE_SIDE,
    STREAMING_KV_BYTES,
    STREAMING_MAX_TOKENS,
    STREAMING_PRESET,
    Workload,
)

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS_FILES = {  # what BENCHMARKS.md is rendered from, each written by its own command
    "throughput": REPO / "benchmarks" / "results.json",  # python -m benchmarks.run
    "tuning": REPO / "benchmarks" / "tuning.json",  # python -m benchmarks.tune
    "incremental": REPO / "benchmarks" / "incremental.json",  # python -m benchmarks.incremental
    "budgets": REPO / "benchmarks" / "budgets.json",  # python -m benchmarks.budgets
    "text_layer": REPO / "benchmarks" / "text_layer.json",  # python -m benchmarks.text_layer
    "loop_rule": REPO / "benchmarks" / "loop_rule.json",  # python -m benchmarks.loop_rule
    "confidence": REPO / "benchmarks" / "confidence.json",  # python -m benchmarks.confidence
    "sharing": REPO / "benchmarks" / "sharing.json",  # python -m benchmarks.sharing
}

# name -> (what is compared, threshold, "min" = the figure must be at least the threshold)
TARGETS: Mapping[str, tuple[str, float, str]] = {
    "b_over_a": ("pipeline tasks/s over raw engine ceiling, (b)/(a)", 0.9, "min"),
    "b_over_c": ("pipeline over RunInference-style synchronous batches, (b)/(c)", 1.5, "min"),
    "b_over_d": ("pipeline over the server design, (b)/(d)", 1.2, "min"),
    "prefix_reuse": ("prefix reuse of (b), cached / shareable tokens", 0.95, "min"),
    "engine_busy": ("engine busy fraction of (b)", 0.95, "min"),
    "rss_ratio": ("streaming: pipeline peak RSS at the larger / smaller input", 1.1, "max"),
}

COLUMNS = (
    ("items/s", "items_per_s"),
    ("tasks/s", "tasks_per_s"),
    ("prompt tok/s", "prompt_tokens_per_s"),
    ("gen tok/s", "generated_tokens_per_s"),
    ("prefix reuse", "prefix_reuse_ratio"),
    ("engine busy", "engine_busy_fraction"),
    ("peak RSS MiB", "peak_rss_mib"),
    ("wall s", "wall_s"),
    ("engine steps", "engine_steps"),
)


# The host-bound table: what the host spends per item, and where.
HOST_COLUMNS = (
    ("items/s", "items_per_s"),
    ("tasks/s", "tasks_per_s"),
    ("tasks/s, each run", "runs"),
    ("engine busy", "engine_busy_fraction"),
    ("Beam process CPU ms/item", "front_cpu_ms_per_item"),
    ("engine-core process CPU ms/item", "child_cpu_ms_per_item"),
    ("engine time outside the model ms/item", "engine_host_ms_per_item"),
    ("images preprocessed / requests", "preprocessed"),
    ("prefix reuse", "prefix_reuse_ratio"),
    ("peak RSS MiB", "peak_rss_mib"),
    ("wall s", "wall_s"),
)
BENCH_KEYS = ("a", "b", "c", "d", "d1", "e1", "e2")
HOST_KEYS = ("ha", "hb", "hb2", "hb0", "hf1", "hf2")


def _host_figures(figures: Mapping[str, Any]) -> dict[str, Any]:
    """Per-item CPU of each process and the preprocessing share, from a host-bound variant's figures."""
    items = figures["items"] or 1
    extra: dict[str, Any] = {}
    if figures.get("front_cpu_s") is not None:
        extra["front_cpu_ms_per_item"] = round(figures["front_cpu_s"] / items * 1000, 1)
        extra["child_cpu_ms_per_item"] = round(figures["child_cpu_s"] / items * 1000, 1)
    if figures.get("engine_host_s") is not None:
        extra["engine_host_ms_per_item"] = round(figures["engine_host_s"] / items * 1000, 1)
    if figures.get("tasks_per_s_runs"):
        extra["runs"] = ", ".join(f"{value:.2f}" for value in figures["tasks_per_s_runs"])
    if figures.get("requests_rendered"):
        extra["preprocessed"] = f"{figures['images_preprocessed']} / {figures['requests_rendered']}"
    return extra


def _tasks_per_s(results: Mapping[str, VariantResult], key: str) -> Optional[float]:
    return results[key].figures()["tasks_per_s"] if key in results else None


def results_document(
    *,
    command: str,
    started: datetime.datetime,
    finished: datetime.datetime,
    machine: Mapping[str, Any],
    load_at_start: float,
    loads: Mapping[str, float],
    workloads: Mapping[str, Workload],
    parameters: int,
    variants: Sequence[Any],
    results: Mapping[str, VariantResult],
    step_cost: Sequence[Mapping[str, Any]],
    streaming: Mapping[int, Mapping[str, Any]],
    errors: Mapping[str, str],
    suffix_tokens: Mapping[str, Mapping[str, int]],
    host_stages: Sequence[Mapping[str, Any]],
    host_parameters: int,
) -> dict[str, Any]:
    tps = {key: _tasks_per_s(results, key) for key in BENCH_KEYS + HOST_KEYS}
    ratios = {
        "hb_over_ha": ratio(tps["hb"], tps["ha"]),
        "hb2_over_hb": ratio(tps["hb2"], tps["hb"]),
        "hb2_over_ha": ratio(tps["hb2"], tps["ha"]),
        "hb_over_hb0": ratio(tps["hb"], tps["hb0"]),
        "hf2_over_hf1": ratio(tps["hf2"], tps["hf1"]),
        "b_over_a": ratio(tps["b"], tps["a"]),
        "b_over_c": ratio(tps["b"], tps["c"]),
        "b_over_d": ratio(tps["b"], tps["d"]),
        "b_over_d1": ratio(tps["b"], tps["d1"]),
        "c_over_a": ratio(tps["c"], tps["a"]),
        "d_over_a": ratio(tps["d"], tps["a"]),
        "e1_over_b": ratio(tps["e1"], tps["b"]),
        "e2_over_b": ratio(tps["e2"], tps["b"]),
    }
    b = results["b"].figures() if "b" in results else {}
    sizes = sorted(streaming)
    rss_ratio = ratio(streaming[sizes[-1]]["peak_rss_mib"], streaming[sizes[0]]["peak_rss_mib"]) if len(sizes) > 1 else None
    measured = {
        "b_over_a": ratios["b_over_a"],
        "b_over_c": ratios["b_over_c"],
        "b_over_d": ratios["b_over_d"],
        "prefix_reuse": b.get("prefix_reuse_ratio"),
        "engine_busy": b.get("engine_busy_fraction"),
        "rss_ratio": rss_ratio,
    }
    targets = {}
    for name, (what, threshold, kind) in TARGETS.items():
        value = measured[name]
        met = None if value is None else (value >= threshold if kind == "min" else value <= threshold)
        targets[name] = {"what": what, "target": threshold, "kind": kind, "measured": value, "met": met}
    return {
        # The two figures the Dataflow capacity planner reads.
        "pipeline_efficiency": ratios["b_over_a"],
        "prefix_reuse_ratio": b.get("prefix_reuse_ratio"),
        "date": started.strftime("%Y-%m-%d"),
        "started_utc": started.isoformat(timespec="seconds"),
        "duration_s": round((finished - started).total_seconds()),
        "command": command,
        "machine": {**machine, "load_1min_at_start": load_at_start},
        "load_1min_before_variant": dict(loads),
        "model": {"preset": "bench", "parameters": parameters, "path": workloads["bench"].model_path},
        "host_model": {"preset": workloads["host"].model_id, "parameters": host_parameters,
                       "path": workloads["host"].model_path},
        "workload": _workload_document(workloads["bench"], suffix_tokens["bench"]),
        "host_workload": _workload_document(workloads["host"], suffix_tokens["host"]),
        "variants": {
            key: {"title": variant.title, "workload": variant.workload, **figures, **_host_figures(figures)}
            for key, result in results.items()
            for variant in variants if variant.key == key
            for figures in [result.figures()]
        },
        "host_stages": list(host_stages),
        "ratios": ratios,
        "decode_step_cost": list(step_cost),
        "streaming": {str(k): v for k, v in streaming.items()},
        "rss_ratio": rss_ratio,
        "targets": targets,
        "errors": dict(errors),
    }


def _workload_document(workload: Workload, suffix_tokens: Mapping[str, int]) -> dict[str, Any]:
    return {
        "items": len(list(workload.images.glob("img_*"))),
        "tasks": ["ocr", "caption", "detect"],
        "max_tokens": dict(workload.max_tokens),
        "vision_tokens": workload.vision_tokens,
        "engine_profile": workload.profile,
        "engine_arg_overrides": dict(workload.engine_args),
        "prompt_suffix_tokens": dict(suffix_tokens),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.0f}"
    return str(value)


def table(document: Mapping[str, Any], workload: str = "bench", columns: Sequence[tuple[str, str]] = COLUMNS) -> str:
    """The variants of one workload ("bench" or "host") as a table."""
    lines = [
        "| variant | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for key, figures in document["variants"].items():
        if figures.get("workload", "bench") == workload:
            lines.append(f"| ({key}) {figures['title']} | " + " | ".join(_cell(figures.get(field)) for _, field in columns) + " |")
    return "\n".join(lines)


def host_stages_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Items/s per stage and image set, one column per thread count."""
    if not rows:
        return "(not run)"
    threads = sorted({row["threads"] for row in rows})
    cells: dict[tuple[str, str, str], dict[int, Mapping[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["images"], row.get("model", "-"), row["stage"]), {})[row["threads"]] = row
    lines = ["| images | model's processor | stage | " + " | ".join(f"{n} thread{'s' if n > 1 else ''}" for n in threads)
             + " | CPU ms/item (1 thread) |", "|---|---|---|" + "---:|" * (len(threads) + 1)]
    for (images, model, stage), by_threads in cells.items():
        rates = " | ".join(
            f"{by_threads[n]['items_per_s']} ({by_threads[n]['cores_busy']} cores)" if n in by_threads else "-" for n in threads
        )
        single = by_threads.get(threads[0], {}).get("cpu_ms_per_item")
        lines.append(f"| {images} | {model} | {stage} | {rates} | {single if single is not None else '-'} |")
    return "\n".join(lines)


def step_cost_table(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return "(not run)"
    lines = ["| sequences running | ms per step | generated tok/s |", "|---:|---:|---:|"]
    lines += [f"| {row['sequences']} | {row['ms_per_step']} | {row['tokens_per_s']} |" for row in rows]
    return "\n".join(lines)


def targets_table(document: Mapping[str, Any]) -> str:
    lines = ["| target | goal | measured | met |", "|---|---:|---:|:---:|"]
    for target in document["targets"].values():
        goal = ("≥ " if target["kind"] == "min" else "≤ ") + f"{target['target']}"
        met = {True: "yes", False: "**no**", None: "not run"}[target["met"]]
        lines.append(f"| {target['what']} | {goal} | {_cell(target['measured'])} | {met} |")
    return "\n".join(lines)


def tuning_table(tuning: Optional[Mapping[str, Any]]) -> str:
    """benchmarks/tuning.json as a table: per knob and value, the runs' tasks/s (repeats interleaved)."""
    if not tuning:
        return "(no benchmarks/tuning.json: run `python -m benchmarks.tune`)"
    lines = ["| knob | measured on | value | tasks/s (each run) | prefix reuse | peak RSS MiB |", "|---|---|---|---|---:|---:|"]
    for sweep in tuning["sweeps"]:
        by_value: dict[str, list[Mapping[str, Any]]] = {}
        for row in sweep["rows"]:
            by_value.setdefault(json.dumps(row["value"]), []).append(row)
        for value, rows in by_value.items():
            speeds = ", ".join(_cell(row.get("tasks_per_s")) for row in rows)
            lines.append(
                f"| {sweep['knob']} | ({'a' if rows[0]['variant'] == 'raw' else 'b'}) {rows[0]['items']} images | {value} "
                f"| {speeds} | {_cell(rows[-1].get('prefix_reuse_ratio'))} | {_cell(rows[-1].get('peak_rss_mib'))} |"
            )
    return "\n".join(lines)


def _incremental_run_row(label: str, design: str, run: Mapping[str, Any]) -> str:
    return (
        f"| {label} | {design} | {_cell(run['peak_rss_mib'])} | {_cell(run.get('rss_over_no_history', 1.0))} "
        f"| {_cell(run['wall_s'])} | {_cell(run.get('run_wall_s'))} | {_cell(run['cpu_s'])} "
        f"| {run.get('skipped_items', '-')} / {run.get('skipped_tasks', '-')} | {_cell(run.get('history_candidates'))} "
        f"| {run['load_1min_before']} |{' **' + run['error'] + '**' if 'error' in run else ''}"
    )


def incremental_markdown(document: Optional[Mapping[str, Any]]) -> str:
    """The incremental-runs section of BENCHMARKS.md from benchmarks/incremental.json."""
    from benchmarks.analysis import INCREMENTAL_ANALYSIS

    if not document:
        return "(no benchmarks/incremental.json: run `python -m benchmarks.incremental`)"
    i, h, t = document["input"], document["history"], document["target"]
    designs = {"join": "join (this tree)", "side-input": f"side input ({(document['baseline_commit'] or '')[:10]})"}
    rows = [_incremental_run_row("none (no `--incremental_from`)", "-", document["no_history"])]
    rows += [_incremental_run_row(f"{run['history_rows']:,}", designs[run["design"]], run) for run in document["runs"]]
    met = {True: "met", False: "**not met**", None: "not run"}[t["met"]]
    return f"""Generated by `{document['command']}` on {document['date']} (UTC start {document['started_utc']},
{document['duration_s']} s). Machine: {document['machine']['cores']} cores, {document['machine']['ram_gib']} GiB RAM, shared with
other engineers; 1-minute load average per run in the table.

Input: {i['items']} generated images x {len(i['tasks'])} tasks on the `{i['model']}` model, max_tokens {i['max_tokens']}, a
{i['kv_cache_memory_bytes'] // 2**20} MiB KV pool. History (`benchmarks/history.py`): the run without history's own
{i['template_rows']} result rows replicated under fresh hashes into nights of {h['night_rows']:,} rows, files of
{h['file_rows']:,} rows and row groups of {h['row_group_rows']:,} rows (the sink's 64 MiB), plus planted rows:
{h['planted_items']['full']} items answered for every task, {h['planted_items']['partial']} for one task,
{h['planted_items']['foreign']} by another model and by another prompt version. Every run with a history must
skip {document['expected']['skipped_items']} items and {document['expected']['skipped_tasks']} tasks (checked from its
`run_summary.json`).

| history rows | design | peak RSS MiB | / no history | process wall s | run wall s | CPU s | skipped items / tasks | history candidates | load |
|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Target: peak RSS of the join design at {f"{t['history_rows']:,}" if t['history_rows'] is not None else '-'} history rows over the run
without history ≤ {t['goal']}: measured {_cell(t['measured'])}, {met}.

{INCREMENTAL_ANALYSIS}"""


_BUDGET_COLUMNS = (
    ("prefix groups / image", "prefix_groups_per_image"),
    ("computed prompt tok / image", "computed_prompt_tokens_per_image"),
    ("prefix reuse (in groups)", "prefix_reuse_ratio"),
    ("CPU s / task", "cpu_s_per_task"),
    ("tasks/s", "tasks_per_s"),
)


def budgets_table(document: Mapping[str, Any]) -> str:
    """benchmarks/budgets.json as a table: medians per configuration, tasks/s relative to one-280 per repeat."""
    lines = ["| configuration | budgets | " + " | ".join(title for title, _ in _BUDGET_COLUMNS) + " | tasks/s ÷ one-280 |",
             "|---|---|" + "---:|" * (len(_BUDGET_COLUMNS) + 1)]
    for name, budgets in document["configurations"].items():
        row = document["summary"].get(name)
        if row is None:
            lines.append(f"| {name} | failed: see benchmarks/budgets.json |" + " |" * len(_BUDGET_COLUMNS))
            continue
        job = document["workload"]["job_vision_tokens"]
        said = ", ".join(f"{task} {budgets.get(task, job)}" for task in document["workload"]["max_tokens"])
        lines.append(f"| {name} | {said} | " + " | ".join(_cell(row[key]) for _, key in _BUDGET_COLUMNS)
                     + f" | {' / '.join(_cell(v) for v in row['tasks_per_s_vs_one_280'])} |")
    return "\n".join(lines)


def budgets_markdown(document: Optional[Mapping[str, Any]]) -> str:
    """The per-task image budgets section of BENCHMARKS.md from benchmarks/budgets.json."""
    from benchmarks.analysis import BUDGETS_ANALYSIS

    if not document:
        return "(no benchmarks/budgets.json: run `python -m benchmarks.budgets`)"
    w, m = document["workload"], document["machine"]
    loads = ", ".join(f"{run['configuration']}#{run['repeat']} {run['load_1min']}" for run in document["runs"])
    return f"""Generated by `{document['command']}` on {document['date']}. Machine: {m['cores']} cores, {m['ram_gib']} GiB
RAM, shared with other engineers; 1-minute load average {document['load_1min_at_start']} at the start, per run: {loads}.
The pipeline (variant b) on {w['items']} generated images x 3 tasks, max_tokens {w['max_tokens']}, engine profile
`{w['engine_profile']}`, the `bench` model ({document['model']['parameters'] / 1e6:.1f} M parameters); tasks without a
budget of their own use the job's {w['job_vision_tokens']}. Medians over the repeats; the last column is each repeat's
tasks/s over one-280's in the same repeat (configurations run interleaved).

{budgets_table(document)}

{BUDGETS_ANALYSIS}"""


def text_layer_markdown(document: Optional[Mapping[str, Any]]) -> str:
    """The born-digital PDFs section of BENCHMARKS.md from benchmarks/text_layer.json."""
    if not document:
        return "(no benchmarks/text_layer.json: run `python -m benchmarks.text_layer`)"
    m, pdf, h, r = document["machine"], document["pdf"], document["host"], document["ratio"]
    rows = "\n".join(
        f"| `{run['mode']}` | {run['pages']:,} | {_cell(run['run_wall_s'])} | {_cell(run['pages_per_s'])} "
        f"| {run['tasks_submitted']:,} | {run['tasks_from_text_layer']:,} | {run['pages_not_rendered']:,} "
        f"| {', '.join(f'{k} {v:,}' for k, v in sorted(run['verdicts'].items()))} | {run['load_1min_before']} |"
        for run in document["runs"].values()
    )
    met = "met" if r["met"] else "**not met**"
    return f"""Generated by `{document['command']}` on {document['date']} (UTC start {document['started_utc']},
{document['duration_s']} s). Machine: {m['cores']} cores, {m['ram_gib']} GiB RAM, shared with other engineers; 1-minute
load average per run in the table. Document: `{pdf['path']}` (Debian r-doc-pdf), {pdf['pages']:,} pages, {pdf['bytes']:,}
bytes. Task `ocr`; the default tiny random-weight model on CPU for the engine.

| `--text_layer` | pages | run wall s | pages/s | engine requests | text-layer answers | pages not rendered | verdicts | load |
|---|---:|---:|---:|---:|---:|---:|---|---:|
{rows}

Ratio, pages/s of `auto` over `model`: **{_cell(r['auto_over_model_pages_per_s'])}x** (target ≥ {r['target']:g}x: {met}).
The `model` side is a page subset (`--limit`) because the CPU engine needs seconds per page; its wall time
includes the engine's start-up, which a longer run spreads thinner; the random-weight model writes up to
`ocr`'s 2,048 tokens on every page, where a real one stops at the page's end; and an accelerator reads a page in
well under a second, so on TPU or GPU the ratio is smaller than here. The host side alone, which no
accelerator changes (this process, the first {h['pages']} pages, one call per page, each opening the
{pdf['bytes'] // 2**20} MiB document as `render_pdf_page` does): reading a page's text layer
{_cell(h['layer_pages_per_s'])} pages/s, rendering it at 150 dpi {_cell(h['render_pages_per_s'])} pages/s
({_cell(h['render_over_layer_time'])}x the time; load {h['load_1min_before']}). Opening the document dominates both
here; the pipeline reads a unit's layers (`--pages_per_unit`, 8) with one opening. Then the engine-free
path's cost is Beam's per-element work, and a run whose every page its text layer answers starts no
engine at all (`transforms.run_tasks.RunTasks` acquires it at the first page that needs it)."""


def sharing_table(document: Mapping[str, Any]) -> str:
    """benchmarks/sharing.json as a table: one row per budget and tasks per image, before and after side by side."""
    runs = {(run["budget"], run["tasks"], run["code"]): run for run in document["runs"]}
    columns = (("prefix reuse", "prefix_reuse_ratio"), ("of block-aligned", "prefix_reuse_of_block_aligned"),
               ("computed prompt tok / image", "computed_prompt_tokens_per_image"), ("CPU s / task", "cpu_s_per_task"),
               ("tasks/s", "tasks_per_s"))
    lines = ["| budget | tasks / image | " + " | ".join(f"{title} before | after" for title, _ in columns) + " |",
             "|---:|---:|" + "---:|" * (2 * len(columns))]
    for budget, tasks in sorted({(run["budget"], run["tasks"]) for run in document["runs"]}):
        cells = []
        for _, key in columns:
            for code in ("before", "after"):
                run = runs.get((budget, tasks, code), {})
                cells.append("failed" if "error" in run else _cell(run.get(key)))
        lines.append(f"| {budget} | {tasks} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sharing_markdown(document: Optional[Mapping[str, Any]]) -> str:
    """The prefix-sharing section of BENCHMARKS.md from benchmarks/sharing.json."""
    from benchmarks.analysis import SHARING_ANALYSIS

    if not document:
        return "(no benchmarks/sharing.json: run `python -m benchmarks.sharing`)"
    w, m, c = document["workload"], document["machine"], document["commits"]
    loads = ", ".join(f"{run['budget']}x{run['tasks']} {run['code']} {run['load_1min']}" for run in document["runs"])
    return f"""Generated by `{document['command']}` on {document['date']}. Machine: {m['cores']} cores, {m['ram_gib']} GiB
RAM, shared with other engineers; 1-minute load average {document['load_1min_at_start']} at the start, per run: {loads}.
The pipeline (variant b) on {w['items']} generated images, the job's budget for every task, tasks ocr / ocr, caption /
ocr, caption, detect; max_tokens {w['max_tokens']}, engine profile `{w['engine_profile']}`, the `bench` model
({document['model']['parameters'] / 1e6:.1f} M parameters). Before: commit {c['before']}; after: commit {c['after']};
each cell's two runs back to back. One run per cell: tasks/s is a direction only on this shared box.

{sharing_table(document)}

{SHARING_ANALYSIS}"""


def write_benchmarks_md() -> None:
    """BENCHMARKS.md from the stored results of every benchmark command."""
    stored = {name: json.loads(path.read_text()) if path.exists() else None for name, path in RESULTS_FILES.items()}
    (REPO / "BENCHMARKS.md").write_text(
        markdown(stored["throughput"], stored["tuning"], stored["incremental"], stored["budgets"], stored["text_layer"],
                 stored["loop_rule"], stored["confidence"], stored["sharing"])
    )


def loop_rule_markdown(document: Optional[Mapping[str, Any]]) -> str:
    """The loop rule section of BENCHMARKS.md from benchmarks/loop_rule.json."""
    if not document:
        return "(no benchmarks/loop_rule.json: run `python -m benchmarks.loop_rule`)"
    real = "\n".join(f"| {corpus} | {r['documents']:,} | {r['cuts']:,} | {r['flagged']:,} |" for corpus, r in document["real"].items())
    copies = list(next(iter(document["synthetic"].values())))
    synthetic = "\n".join(
        f"| {kind} | " + " | ".join(f"{r[c]['caught'] / r[c]['loops']:.2f} ({r[c]['loop_chars_mean']:,})" for c in copies) + " |"
        for kind, r in document["synthetic"].items()
    )
    flagged = "\n".join(f"- `{fp['source']}` at {fp['at']:,}: {fp['copies']} copies of {json.dumps(fp['span'][:60])}"
                         for fp in document["false_positives"][:6])
    return f"""The rule of `tasks/quality.py` (`repeated_tail`: 8+ copies over 320+ characters, or 5+ copies of a
span of 60+ characters), measured by `python -m benchmarks.loop_rule` ({document['wall_s']:,} s; the rule took
{document['rule_ms_mean']} ms per call on average, on this shared machine). Real text, none written for this, cut
at every 97th character and whole (an answer cut by max_tokens ends anywhere); a flagged cut is a false positive:

| corpus | documents | cuts | flagged |
|---|---:|---:|---:|
{real}

Flagged real cuts (first few): text that does repeat itself (a log repeating one line) or is not text (a tar file):

{flagged}

Synthetic loops: 200 per cell, a span of the same text repeated after a real prefix and cut inside its last
copy. Fraction caught (mean loop length in characters) by copies:

| span | {' | '.join(copies)} |
|---|{'---:|' * len(copies)}
{synthetic}

Loops shorter than 320 characters are not claimed; a looping answer that runs to max_tokens leaves thousands.
Spans over 2,000 characters (a few paragraphs) are not looked for. Measured with a 6,000-character tail window,
since widened to 12,000 so that 5 copies of a 2,000-character span fit (it adds only spans of 1,200-2,000 characters)."""


def confidence_markdown(document: Optional[Mapping[str, Any]]) -> str:
    """The confidence-cost section of BENCHMARKS.md from benchmarks/confidence.json."""
    if not document:
        return "(no benchmarks/confidence.json: run `python -m benchmarks.confidence`)"
    rows = "\n".join(
        f"| {number + 1} | {w['tasks_per_s']} | {wo['tasks_per_s']} | {ratio_:.3f} | {w['generated_tokens']:,} / {wo['generated_tokens']:,} |"
        for number, (w, wo, ratio_) in enumerate(zip(document["rounds"]["with"], document["rounds"]["without"], document["ratio_per_round"]))
    )
    m = document["machine"]
    return f"""What asking vLLM for the sampled tokens' log-probabilities (`SamplingParams(logprobs=0, flat_logprobs=True)`,
the `confidence` column) costs, measured by `python -m benchmarks.confidence`: one `vllm.LLM` with the pipeline's
engine arguments, the `bench` model, {document['items']} generated images x 3 tasks ({document['requests']} requests, greedy,
prefix caching off so that repeated prompts are not served from the cache), generated with and without, alternated
over rounds (the order flips each round). Machine: {m['cores']} cores, shared; 1-minute load average
{document['load_average_at_start']} at the start: expect ±10 % noise per round.

| round | tasks/s with logprobs | tasks/s without | ratio | generated tokens with / without |
|---:|---:|---:|---:|---:|
{rows}

Median ratio (with / without): **{document['ratio_median']}**. The cost is a log-softmax over the vocabulary
(262,144 tokens for Gemma 4) per generated token and a float per token carried back; on an accelerator the model
step is far larger next to it than this tiny random model's on a CPU."""


def host_markdown(document: Mapping[str, Any]) -> str:
    """The host-feed section of BENCHMARKS.md from benchmarks/results.json (results stored before it existed have none)."""
    from benchmarks.analysis import HOST_ANALYSIS

    if "host_workload" not in document:
        return "(no host-bound figures in benchmarks/results.json: run `python -m benchmarks.run`)\n"
    m, r, hw = document["machine"], document["ratios"], document["host_workload"]
    return f"""Model: the `{document['host_model']['preset']}` preset, {document['host_model']['parameters'] / 1e6:.1f} M parameters (random
weights), {hw['vision_tokens']} soft tokens per image: an engine that computes next to nothing, so the host's
work per request (decode, preprocessing, Beam, scheduling, detokenizing, Parquet) weighs as on an
accelerator (why this preset: `benchmarks/workload.py`). Workload: {hw['items']} generated
images, tasks {', '.join(hw['tasks'])} each, max_tokens {hw['max_tokens']}; engine profile `{hw['engine_profile']}`'s
arguments in every variant, on identical prompts. (hb), (hb2), (hb0) place preprocessing as the
accelerator profiles do (on Beam's thread, through the processed-image cache).

{table(document, "host", HOST_COLUMNS)}

Ratios (tasks/s): (hb)/(ha) = {_cell(r['hb_over_ha'])}, (hb2)/(hb) = {_cell(r['hb2_over_hb'])}, (hb2)/(ha) = {_cell(r['hb2_over_ha'])};
shared preprocessing (hb)/(hb0) = {_cell(r['hb_over_hb0'])}; two processes feeding one engine core
(hf2)/(hf1) = {_cell(r.get('hf2_over_hf1'))} (their worker processes start inside the window; `steady_items_per_s`
in `results.json`: between the first and the last answer written).

Host-side stages alone (`benchmarks.variants.run_host_stages`): items/s of one process (and the cores
it kept busy) as its threads grow, each item's three requests rendered as the pipeline renders them
(one at a time), on the workload's images and on {HOST_PAGE_IMAGES} page-sized ones (long side up to {HOST_PAGE_SIDE} px).
This box has {m['cores']} cores: past {m['cores']} threads only the GIL-free share of the work could gain, and it has no core left.

{host_stages_table(document.get('host_stages', ()))}

{HOST_ANALYSIS}"""


def markdown(
    document: Mapping[str, Any],
    tuning: Optional[Mapping[str, Any]] = None,
    incremental: Optional[Mapping[str, Any]] = None,
    budgets: Optional[Mapping[str, Any]] = None,
    text_layer: Optional[Mapping[str, Any]] = None,
    loop_rule: Optional[Mapping[str, Any]] = None,
    confidence: Optional[Mapping[str, Any]] = None,
    sharing: Optional[Mapping[str, Any]] = None,
) -> str:
    from benchmarks.analysis import ANALYSIS, CPU_DTYPE, DEFINITIONS

    m = document["machine"]
    w = document["workload"]
    r = document["ratios"]
    streaming = "\n".join(
        f"| {items} | {row['wall_s']} | {row['peak_rss_mib']} |" for items, row in document["streaming"].items()
    )
    return f"""# Benchmarks: this pipeline against the peers' designs

Generated by `{document['command']}` on {document['date']} (UTC start {document['started_utc']},
{document['duration_s']} s). Machine: {m['cores']} cores ({m['cpu_model']}), {m['ram_gib']} GiB RAM,
shared with other engineers; 1-minute load average {m['load_1min_at_start']} at the start
(per variant: {', '.join(f"{k} {v}" for k, v in document['load_1min_before_variant'].items())}).
Compare figures only within one run.

Model: the `bench` preset of `tiny_model/checkpoint.py`, {document['model']['parameters'] / 1e6:.1f} M
parameters (random weights; hidden 1024, 8 layers, vision tower 4 layers), 280 soft tokens per image.
Workload: {w['items']} generated images (documents, charts, photos; PNG/JPEG, 200-1024 px),
tasks {', '.join(w['tasks'])} each, max_tokens {w['max_tokens']}; engine profile `{w['engine_profile']}`{
f" with overrides {w['engine_arg_overrides']}" if w['engine_arg_overrides'] else ''}, identical engine arguments in every variant.

## Results

{table(document)}

Ratios (tasks/s): (b)/(a) = {_cell(r['b_over_a'])}, (b)/(c) = {_cell(r['b_over_c'])}, (b)/(d) = {_cell(r['b_over_d'])},
(b)/(d1) = {_cell(r['b_over_d1'])}, (c)/(a) = {_cell(r['c_over_a'])}, (d)/(a) = {_cell(r['d_over_a'])}; ablations (e1)/(b) = {_cell(r['e1_over_b'])},
(e2)/(b) = {_cell(r['e2_over_b'])}.

## Targets

{targets_table(document)}

## The host feed: host-bound regime

{host_markdown(document)}
Decode step cost on the bench model (`benchmarks.variants.run_step_cost`: median time of one
decode step with N sequences running, text prompts, same engine arguments). A synchronous
batch's tail steps run few sequences: they cost what the first rows cost, not a full step.

{step_cost_table(document.get('decode_step_cost', ()))}

Streaming check (pipeline, `{STREAMING_PRESET}` model, max_tokens {dict(STREAMING_MAX_TOKENS)}, a {STREAMING_KV_BYTES // 2**20} MiB KV
pool that is fully touched within the first few hundred images, so both sizes compare steady
state; see `benchmarks/run.py`): peak RSS of the pipeline process by input size; ratio
{_cell(document['rss_ratio'])}.

| items | wall s | peak RSS MiB |
|---:|---:|---:|
{streaming}

{ANALYSIS}

## Tuning (engine profile `cpu-tiny`)

One knob at a time from the profile's values, on the bench model: engine knobs on the raw engine
(a), pipeline knobs on the pipeline (b). Produced by `python -m benchmarks.tune` (see
`benchmarks/tuning.json` for the commands, dates and loads); the reasons in
`engine/profiles.py` quote these runs. Run-to-run noise on this shared box is ±10 %.

{tuning_table(tuning)}

## CPU dtype

{CPU_DTYPE}

## Incremental runs against a growing history

{incremental_markdown(incremental)}

## Per-task image budgets

{budgets_markdown(budgets)}

## Born-digital PDFs: the text layer against the model

{text_layer_markdown(text_layer)}

## Loop rule

{loop_rule_markdown(loop_rule)}

## Confidence

{confidence_markdown(confidence)}

## Prefix sharing at every image budget

{sharing_markdown(sharing)}

{DEFINITIONS}
"""
