"""The report page: one self-contained HTML file.

Inline CSS, images as `data:` URIs, no script and no external resource; a
Content-Security-Policy forbids loading or running anything else, as a
second line behind escaping. Every string that comes from a run (model
text, labels, file names, messages, metadata) is data: it goes through
`_e` (credentials masked, control characters visible, HTML-escaped).
"""
from __future__ import annotations

import datetime
import html
import json
from typing import Any, Iterable, Mapping, Optional, Sequence

from reporting.images import SourceImage, data_uri, draw_detections, label_colours, thumbnail
from reporting.run import ErrorGroup, RunData, SampledItem, TaskStats
from reporting.text import safe
from tasks.kinds import kind_of
from tasks.quality import DEGENERATE_FLAGS
from tasks.task import Template

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
TASK_TITLES = {"ocr": "OCR text", "caption": "Caption", "detect": "Detections", "markdown": "Markdown", "layout": "Layout"}
MESSAGE_CHARS = 400  # error messages in the breakdown; the item cards show them whole
CONFIG_KEYS = ("inputs", "manifests", "incremental_from", "output", "tasks", "task_definitions", "max_tokens",
               "vision_tokens", "task_vision_tokens", "max_in_flight", "decode_limits", "shards", "engine_args")

STYLE = """
:root { --ink: #1f2933; --muted: #616e7c; --line: #d9dee5; --page: #f4f6f8; --card: #fff; --accent: #2457c5;
  --bad: #b42318; --bad-bg: #fdecea; --warn: #9a5b00; --warn-bg: #fff4d6; --good: #1e7b34; --good-bg: #e6f4ea; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
  font: 14px/1.45 "DejaVu Sans", "Segoe UI", system-ui, sans-serif; }
main { max-width: 1360px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 18px; margin: 32px 0 10px; padding-bottom: 6px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 0; font-weight: 600; }
h4 { font-size: 13px; margin: 0 0 6px; text-transform: uppercase; letter-spacing: .04em; color: var(--muted); }
code, pre, .mono { font-family: "DejaVu Sans Mono", ui-monospace, monospace; font-size: 12.5px; }
a { color: var(--accent); text-decoration: none; }
a:hover { text-decoration: underline; }
.location { font-size: 15px; word-break: break-all; }
.meta-line { color: var(--muted); margin: 6px 0 0; }
.meta-line b { color: var(--ink); font-weight: 600; }
.banner { margin: 16px 0 0; padding: 10px 14px; border-radius: 6px; border: 1px solid; }
.banner.warn { background: var(--warn-bg); border-color: #f0c36d; color: #5c3b00; }
.banner.bad { background: var(--bad-bg); border-color: #f4a29a; color: var(--bad); }
.banner.info { background: #eaf1fb; border-color: #b7cbef; color: #1d3f7a; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 12px; margin-top: 20px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
  border-top: 4px solid var(--line); }
.card.good { border-top-color: #3aa757; } .card.bad { border-top-color: #d93025; } .card.warn { border-top-color: #f29900; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .value { font-size: 24px; font-weight: 600; margin: 2px 0; }
.card .note { color: var(--muted); font-size: 12px; }
table { border-collapse: collapse; width: 100%; background: var(--card); border: 1px solid var(--line); }
th, td { text-align: left; padding: 7px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background: #eef1f5; font-size: 12px; text-transform: uppercase; letter-spacing: .03em; color: var(--muted); }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.id { word-break: break-all; }
.examples { margin: 0; padding-left: 18px; }
.examples li { margin: 2px 0; }
.examples .msg { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; white-space: pre-wrap; word-break: break-word; }
.examples .who { color: var(--muted); font-size: 12px; word-break: break-all; }
.pill { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #eef1f5;
  color: var(--ink); margin: 0 4px 2px 0; white-space: nowrap; }
.pill.bad { background: var(--bad-bg); color: var(--bad); } .pill.warn { background: var(--warn-bg); color: var(--warn); }
.pill.good { background: var(--good-bg); color: var(--good); }
.item { background: var(--card); border: 1px solid var(--line); border-radius: 8px; margin: 18px 0; overflow: hidden; }
.item.flagged { border-left: 4px solid #d93025; }
.item > header { padding: 10px 14px; border-bottom: 1px solid var(--line); background: #fafbfc; }
.item > header h3 { word-break: break-all; }
.item > header .num { color: var(--muted); font-weight: 400; margin-right: 6px; }
.item > header .pills { margin-top: 6px; }
.item-body { display: grid; grid-template-columns: minmax(0, var(--thumb)) minmax(0, 1fr); gap: 16px; padding: 14px; }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--line); background: #fff;
  image-rendering: auto; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.noimage { border: 2px dashed var(--line); border-radius: 6px; padding: 28px 16px; text-align: center; color: var(--muted);
  min-height: 160px; display: flex; flex-direction: column; justify-content: center; }
.noimage strong { color: var(--ink); display: block; margin-bottom: 6px; }
.noimage .reason { font-family: "DejaVu Sans Mono", monospace; font-size: 12px; word-break: break-word; }
.panels { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 12px; align-content: start; }
.panels.split { grid-template-columns: minmax(0, 1.3fr) minmax(0, 1fr); }
.panels.split > .lead pre.text { max-height: 34em; }
.panel { border: 1px solid var(--line); border-radius: 6px; padding: 10px 12px; min-width: 0; }
.panel.failed { border-color: #f4a29a; background: #fffafa; }
.panel pre.text { white-space: pre-wrap; word-break: break-word; margin: 0; max-height: 22em; overflow: auto;
  background: #f8f9fb; border-radius: 4px; padding: 8px; font-size: 12.5px; }
.panel .empty { color: var(--muted); font-style: italic; }
.panel .stats { color: var(--muted); font-size: 11.5px; margin: 8px 0 0; }
.panel .question { margin: 0 0 8px; padding: 6px 8px; border-left: 3px solid var(--accent); background: #eaf1fb;
  font-size: 12.5px; white-space: pre-wrap; word-break: break-word; }
.dets { margin: 0; padding-left: 0; list-style: none; max-height: 22em; overflow: auto; }
.dets li { margin: 3px 0; display: flex; gap: 6px; align-items: baseline; }
.dets .swatch { flex: none; width: 11px; height: 11px; border-radius: 2px; display: inline-block; position: relative; top: 1px; }
.dets .n { color: var(--muted); font-size: 12px; min-width: 1.6em; }
.dets .lbl { font-weight: 600; word-break: break-word; }
.dets .px { color: var(--muted); font-size: 11.5px; white-space: nowrap; margin-left: auto; }
.item-errors { padding: 0 14px 14px; }
.item-errors table { font-size: 13px; }
.item-errors .msg { white-space: pre-wrap; word-break: break-word; font-family: "DejaVu Sans Mono", monospace; font-size: 12px; }
details { margin-top: 6px; }
details summary { cursor: pointer; color: var(--accent); font-size: 12.5px; }
details pre { white-space: pre-wrap; word-break: break-word; background: #f8f9fb; padding: 8px; border-radius: 4px;
  max-height: 24em; overflow: auto; margin: 6px 0 0; }
.item-meta { padding: 0 14px 12px; }
footer { color: var(--muted); font-size: 12px; margin-top: 36px; border-top: 1px solid var(--line); padding-top: 10px; }
@media (max-width: 960px) { .item-body { grid-template-columns: 1fr; } }
"""


def _e(value: Any) -> str:
    """Any value as HTML text: credentials masked, control characters visible, markup escaped."""
    return html.escape(safe(value), quote=True)


def _n(value: Any, digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return _e(value)


def _time(iso: Optional[str]) -> Optional[str]:
    """`2026-11-22T06:35:01.49+00:00` -> `2026-11-22 06:35:01 UTC` (as given when not ISO)."""
    try:
        moment = datetime.datetime.fromisoformat(iso) if iso else None
    except ValueError:
        return iso
    if moment is None or moment.tzinfo is None:
        return iso
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _pill(text: str, tone: str = "") -> str:
    return f'<span class="pill {tone}">{_e(text)}</span>'


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Sequence[bool]) -> str:
    """Cells are HTML already; `numeric` right-aligns columns."""
    head = "".join(f'<th class="{"num" if num else ""}">{_e(h)}</th>' for h, num in zip(header, numeric))
    body = "".join(
        "<tr>" + "".join(f'<td class="{"num" if num else ""}">{cell}</td>' for cell, num in zip(row, numeric)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _card(label: str, value: str, note: str = "", tone: str = "") -> str:
    return (f'<div class="card {tone}"><div class="label">{_e(label)}</div><div class="value">{value}</div>'
            f'<div class="note">{note}</div></div>')


def _cards(summary: Mapping[str, Any], tasks: Sequence[TaskStats]) -> str:
    counts = summary.get("counts") or {}
    accounting = summary.get("accounting") or {}
    tokens = summary.get("tokens") or {}
    latency = summary.get("request_latency_ms") or {}
    items_in, decoded = accounting.get("items_in"), counts.get("items")
    item_note = []
    if items_in is not None and decoded is not None:
        item_note.append(f"{_n(decoded)} decoded · {_n(items_in - decoded)} failed before the engine")
    if counts.get("files_matched") is not None:
        item_note.append(f"{_n(counts.get('files_matched'))} files · {_n(counts.get('pages'))} pages")
    by_stage = counts.get("error_rows_by_stage") or {}
    errors = counts.get("error_rows")
    cards = [
        _card("Items", _n(items_in if items_in is not None else decoded), "<br>".join(item_note)),
        _card("Result rows", _n(counts.get("result_rows")), _e(", ".join(t.task for t in tasks) or "no results")),
        _card("Error rows", _n(errors), _e(" · ".join(f"{stage} {count}" for stage, count in by_stage.items())),
              "bad" if errors else "good"),
    ]
    if "balanced" in accounting:
        balanced = accounting["balanced"]
        cards.append(_card(
            "Accounting", "balanced" if balanced else "NOT balanced",
            f"{_n(accounting.get('task_rows_written'))} of {_n(accounting.get('task_rows_expected'))} task rows written",
            "good" if balanced else "bad",
        ))
    truncated = counts.get("truncated_outputs")
    cards.append(_card("Truncated outputs", _n(truncated), "finish_reason = length", "warn" if truncated else ""))
    if "flagged_results" in counts:
        flagged = counts["flagged_results"]
        by_flag = " · ".join(f"{flag} {count}" for flag, count in (counts.get("quality_flags") or {}).items())
        cards.append(_card("Flagged results", _n(flagged), _e(by_flag or "still degenerate after retries"),
                           "warn" if flagged else "good"))
    cards.append(_card("Detections", _n(counts.get("detections")), "boxes in the results"))
    if counts.get("skipped_items") or counts.get("skipped_tasks"):
        cards.append(_card("Skipped (incremental)", _n(counts.get("skipped_items")),
                           f"{_n(counts.get('skipped_tasks'))} tasks answered by earlier runs"))
    cached_fraction = tokens.get("cached_fraction_of_prompt")
    cards.append(_card(
        "Prompt tokens", _n(tokens.get("prompt")),
        f"generated {_n(tokens.get('generated'))} · cached {_n(tokens.get('cached'))}"
        + (f" ({cached_fraction * 100:.0f}% of prompt)" if cached_fraction is not None else ""),
    ))
    if latency:
        cards.append(_card("Request latency", f"{_n(float(latency.get('mean') or 0), 0)} ms",
                           f"min {_n(latency.get('min'))} · max {_n(latency.get('max'))} · {_n(latency.get('count'))} requests"))
    wall = summary.get("wall_time_s")
    if wall:
        rate = f"{decoded / wall:,.2f} items/s" if decoded else ""
        cards.append(_card("Wall time", f"{_n(float(wall))} s", rate))
    return f'<div class="cards">{"".join(cards)}</div>'


def _header(run: RunData) -> str:
    summary = run.summary
    model = summary.get("model") or {}
    facts = [("run", summary.get("run_id")), ("state", summary.get("state")), ("model", model.get("id")),
             ("prompts", summary.get("prompt_version")), ("finished", _time(summary.get("finished_at")))]
    line = " · ".join(f"{name} <b>{_e(value)}</b>" for name, value in facts if value)
    banners = []
    if summary.get("warning") or model.get("random_weights"):
        banners.append(f'<div class="banner warn"><b>Random weights.</b> {_e(summary.get("warning") or "")}</div>')
    if summary.get("state") == "FAILED":
        banners.append(f'<div class="banner bad"><b>Run failed:</b> {_e(summary.get("state_reason") or "")}</div>')
    for warning in summary.get("warnings") or ():
        if warning != summary.get("warning"):  # the random-weights warning has its banner above
            banners.append(f'<div class="banner warn">{_e(warning)}</div>')
    if run.summary_from_tables:
        banners.append('<div class="banner info">No <code>run_summary.json</code> at this location '
                       "(the run did not finish, or these are hand-made tables): figures are computed from the tables.</div>")
    if (summary.get("accounting") or {}).get("balanced") is False:
        banners.append('<div class="banner bad"><b>Accounting does not balance:</b> results + errors differ from the '
                       "inputs; see <code>accounting</code> in run_summary.json.</div>")
    config = {key: value for key, value in (summary.get("config") or {}).items() if key in CONFIG_KEYS}
    details = ""
    if config or summary.get("versions"):
        text = json.dumps({"config": config, "versions": summary.get("versions")}, indent=1, ensure_ascii=False, default=str)
        details = f"<details><summary>Run configuration and versions</summary><pre>{_e(text)}</pre></details>"
    return (f'<h1>Run report</h1><div class="location"><code>{_e(run.location)}</code></div>'
            f'<p class="meta-line">{line}</p>{details}{"".join(banners)}')


def _tasks_section(tasks: Sequence[TaskStats]) -> str:
    if not tasks:
        return "<h2>Tasks</h2><p>No result rows.</p>"
    rows = [
        [f"<b>{_e(t.task)}</b>", _n(t.rows), _n(t.truncated), _n(t.flagged), _n(t.mean_confidence, 3), _n(t.detections),
         _n(t.prompt_tokens), _n(t.generated_tokens), _n(t.cached_tokens), _n(t.mean_latency_ms)]
        for t in tasks
    ]
    header = ["task", "result rows", "truncated", "flagged", "mean confidence", "detections", "prompt tokens",
              "generated tokens", "cached tokens", "mean latency ms"]
    return "<h2>Tasks</h2>" + _table(header, rows, [False] + [True] * 9)


def _errors_section(groups: Sequence[ErrorGroup], anchors: Mapping[str, str]) -> str:
    if not groups:
        return '<h2>Errors</h2><p><span class="pill good">no error rows</span></p>'

    def example(item_id: str, message: str) -> str:
        shown = message if len(message) <= MESSAGE_CHARS else message[:MESSAGE_CHARS] + "…"
        who = f'<a href="#{anchors[item_id]}">{_e(item_id)}</a>' if item_id in anchors else _e(item_id)
        return f'<li><div class="msg">{_e(shown)}</div><div class="who">{who}</div></li>'

    rows = [
        [_e(g.stage), f"<code>{_e(g.error_type)}</code>", _n(g.count),
         '<ul class="examples">' + "".join(example(item, message) for item, message in g.examples) + "</ul>"]
        for g in groups
    ]
    total = sum(g.count for g in groups)
    return (f"<h2>Errors <small>({_n(total)} rows by stage and type)</small></h2>"
            + _table(["stage", "error type", "rows", "example messages"], rows, [False, False, True, False]))


def _task_stats_line(row: Mapping[str, Any]) -> str:
    parts = [f"finish {_e(row.get('finish_reason'))}", f"prompt {_n(row.get('prompt_tokens'))}",
             f"generated {_n(row.get('generated_tokens'))}", f"cached {_n(row.get('cached_tokens'))}"]
    if row.get("latency_ms") is not None:
        parts.append(f"{_n(float(row['latency_ms']), 0)} ms")
    if row.get("confidence") is not None:  # geometric-mean token probability (tasks/quality.py)
        parts.append(f"confidence {_n(float(row['confidence']), 3)}")
    if row.get("language"):
        parts.append(f"language {_e(row['language'])}")
    if row.get("field_confidence"):  # a json answer's fields, each with its value's confidence
        parts.append("fields " + ", ".join(f"{_e(f['field'])} {_n(float(f['confidence']), 3)}" for f in row["field_confidence"]))
    return f'<p class="stats">{" · ".join(parts)}</p>'


def _detections_list(detections: Sequence[Mapping[str, Any]]) -> str:
    if not detections:
        return '<p class="empty">no boxes</p>'
    colours = label_colours(d.get("label") or "" for d in detections)
    items = []
    for number, d in enumerate(detections, 1):
        px = d.get("box_px") or {}
        where = (f"x {px.get('xmin')}–{px.get('xmax')}, y {px.get('ymin')}–{px.get('ymax')} px"
                 if px.get("xmin") is not None else "")
        items.append(
            f'<li><span class="n">{number}</span><span class="swatch" style="background:{colours[d.get("label") or ""]}">'
            f'</span><span class="lbl">{_e(d.get("label") or "")}</span><span class="px">{_e(where)}</span></li>'
        )
    return f'<ol class="dets">{"".join(items)}</ol>'


def asks_per_item(definition: Optional[Mapping[str, Any]]) -> bool:
    """A task whose instruction is filled from each item's metadata (a question per item), or one the run does not describe."""
    return definition is None or bool(Template(definition.get("instruction") or "").placeholders)


def _question(row: Mapping[str, Any], errors: Sequence[Mapping[str, Any]], definition: Optional[Mapping[str, Any]]) -> str:
    """What this item was asked, when the task asks each item its own question."""
    asked = row.get("instruction") or next((e.get("instruction") for e in errors if e.get("instruction")), None)
    return f'<p class="question">{_e(asked)}</p>' if asked and asks_per_item(definition) else ""


def _panel(
    task: str,
    row: Optional[Mapping[str, Any]],
    errors: Sequence[Mapping[str, Any]],
    lead_rows: int = 0,
    definition: Optional[Mapping[str, Any]] = None,
) -> str:
    """One task's answer; `lead_rows` > 0: the wide first column, as tall as that many other panels.

    `definition`: the task as the run summary describes it (output kind, instruction template).
    """
    title = _e(TASK_TITLES.get(task, task))
    lead = f' lead" style="grid-row: span {lead_rows}' if lead_rows else ""
    if row is None:
        if errors:
            reasons = "".join(f'<p><span class="pill bad">{_e(e["stage"])}</span> <code>{_e(e["error_type"])}</code></p>'
                              f'<pre class="text">{_e(e.get("message") or "")}</pre>' for e in errors)
            return f'<section class="panel failed{lead}"><h4>{title}</h4>{_question({}, errors, definition)}{reasons}</section>'
        return f'<section class="panel{lead}"><h4>{title}</h4><p class="empty">no result</p></section>'
    shown = list(row.get("quality_flags") or ()) or (["truncated"] if row.get("truncated") else [])
    flags = "".join(" " + _pill(flag, "warn" if flag in DEGENERATE_FLAGS else "") for flag in shown)
    text = row.get("text") or ""
    kind = kind_of(row)
    regions, document = kind.regions(row), kind.document(row)
    if regions is not None:  # boxes (detections, layout blocks): listed as drawn on the image
        body = _detections_list(regions)
        body += f'<details><summary>text</summary><pre>{_e(text)}</pre></details>'
        title += f" ({len(regions)})"
    elif document is not None:  # a JSON document: laid out to be read
        body = f'<pre class="text json">{_e(json.dumps(document, indent=2, ensure_ascii=False))}</pre>'
        body += f'<details><summary>model output</summary><pre>{_e(text)}</pre></details>'
        title += " (JSON)"
    else:
        body = f'<pre class="text">{_e(text)}</pre>' if text.strip() else '<p class="empty">(empty)</p>'
    if row.get("thought"):  # thinking mode: what the model thought before this answer
        body += f'<details><summary>thought</summary><pre>{_e(row["thought"])}</pre></details>'
    question = _question(row, errors, definition)
    return f'<section class="panel{lead}"><h4>{title}{flags}</h4>{question}{body}{_task_stats_line(row)}</section>'


def _picture(item: SampledItem, source: Optional[SourceImage], side: int) -> str:
    if source is None or source.image is None:
        reason = source.reason if source is not None else "not loaded"
        return (f'<div class="noimage"><strong>Source not available</strong>'
                f'<span class="reason">{_e(reason)}</span></div>')
    # The first answer with boxes (detections, layout blocks) is drawn.
    detections = next((regions for regions in (kind_of(r).regions(r) for r in item.results) if regions), [])
    small = thumbnail(source.image, side)
    if detections:
        small = draw_detections(small, detections)
    caption = f"{source.image.width}×{source.image.height} px"
    if detections:
        caption += f" · {len(detections)} box{'es' if len(detections) != 1 else ''} drawn"
    changed = ""
    if item.content_hash and source.content_hash and source.content_hash != item.content_hash:
        changed = " " + _pill("source changed since the run", "bad")
    return (f'<figure><img src="{data_uri(small)}" width="{small.width}" height="{small.height}" '
            f'alt="{_e(item.item_id)}"><figcaption>{_e(caption)}{changed}</figcaption></figure>')


def _item_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    if not errors:
        return ""
    rows = []
    for e in errors:
        raw = e.get("raw_output")
        raw_html = f'<details><summary>raw model output</summary><pre>{_e(raw)}</pre></details>' if raw else ""
        rows.append([_e(e.get("task") or "whole item"), _e(e["stage"]), f"<code>{_e(e['error_type'])}</code>",
                     f'<div class="msg">{_e(e.get("message") or "")}</div>{raw_html}'])
    return '<div class="item-errors">' + _table(["task", "stage", "error type", "message"], rows, [False] * 4) + "</div>"


def _errors_label(count: int) -> str:
    return f"{count} error{'s' if count != 1 else ''}"


def _item_pills(item: SampledItem) -> str:
    pills = []
    if item.page is not None:
        pills.append(_pill(f"page {item.page}"))
    if item.member is not None:
        pills.append(_pill(f"member {item.member}"))
    if item.width and item.height:
        pills.append(_pill(f"{item.width}×{item.height} px"))
    if item.content_hash:
        pills.append(_pill(f"sha256 {item.content_hash[:12]}…"))
    truncated = [r["task"] for r in item.results if r.get("truncated")]
    if truncated:
        pills.append(_pill(f"truncated: {', '.join(truncated)}", "warn"))
    if item.errors:
        pills.append(_pill(_errors_label(len(item.errors)), "bad"))
    elif item.results and not truncated:
        pills.append(_pill("ok", "good"))
    return "".join(pills)


def _item_card(
    number: int, anchor: str, item: SampledItem, tasks: Sequence[str], definitions: Mapping[str, Mapping[str, Any]],
    source: Optional[SourceImage], side: int,
) -> str:
    by_task = {r["task"]: r for r in item.results}
    item_tasks = list(tasks) + [t for t in by_task if t not in tasks]
    decoded = bool(item.results) or any(e.get("task") for e in item.errors)
    # Text tasks (OCR first) get the wide first column, the others stack beside it.
    first = by_task.get(item_tasks[0]) if item_tasks else None
    split = len(item_tasks) > 1 and (first is None or kind_of(first).regions(first) is None)
    panels = "".join(
        _panel(task, by_task.get(task), [e for e in item.errors if e.get("task") == task],
               len(item_tasks) - 1 if split and index == 0 else 0, definitions.get(task))
        for index, task in enumerate(item_tasks)
    ) if decoded else '<section class="panel failed"><h4>No tasks ran</h4><p>The item failed before the engine: see below.</p></section>'
    metadata = (f'<div class="item-meta"><details><summary>metadata</summary><pre>{_e(item.metadata)}</pre></details></div>'
                if item.metadata else "")
    return (
        f'<article class="item{" flagged" if item.errors else ""}" id="{anchor}"><header>'
        f'<h3><span class="num">#{number}</span>{_e(item.item_id)}</h3><div class="pills">{_item_pills(item)}</div></header>'
        f'<div class="item-body">{_picture(item, source, side)}<div class="panels{" split" if decoded and split else ""}">{panels}</div></div>'
        f"{_item_errors(item.errors)}{metadata}</article>"
    )


def _sample_section(
    run: RunData, images: Mapping[str, SourceImage], tasks: Sequence[str], side: int, anchors: Mapping[str, str]
) -> str:
    definitions = (run.summary.get("config") or {}).get("task_definitions") or {}
    index_rows = [
        [_n(n), f'<a href="#{anchors[item.item_id]}">{_e(item.item_id)}</a>',
         _e(f"{item.width}×{item.height}") if item.width else "—",
         _e(", ".join(r["task"] for r in item.results) or "—"),
         (_pill(_errors_label(len(item.errors)), "bad") if item.errors else "")
         + (_pill("truncated", "warn") if any(r.get("truncated") for r in item.results) else "")]
        for n, item in enumerate(run.sample, 1)
    ]
    order = {"item_id": "by item id", "errors_first": "items with errors first, then with truncated outputs, then by item id",
             "spread": "evenly spread over the items sorted by id"}[run.sample_order]
    intro = (f"<p>{_n(len(run.sample))} of {_n(run.items_total)} items, {_e(order)}. Images are re-read from the "
             "sources with the pipeline's decoder; boxes are drawn where the model put them.</p>")
    index = _table(["#", "item", "size", "results", "flags"], index_rows, [True, False, False, False, False])
    cards = "".join(
        _item_card(n, anchors[item.item_id], item, tasks, definitions, images.get(item.item_id), side)
        for n, item in enumerate(run.sample, 1)
    )
    return f"<h2>Sample of items</h2>{intro}{index}{cards}"


def run_tasks(run: RunData) -> list[str]:
    """Tasks the run asked for (from the summary), else those in its results."""
    configured = (run.summary.get("config") or {}).get("tasks")
    return list(configured) if configured else [t.task for t in run.tasks]


def render(run: RunData, images: Mapping[str, SourceImage], side: int, generated_at: Optional[datetime.datetime] = None) -> str:
    """The whole page."""
    generated_at = generated_at or datetime.datetime.now(datetime.timezone.utc)
    anchors = {item.item_id: f"item-{n}" for n, item in enumerate(run.sample, 1)}
    body = (
        _header(run)
        + _cards(run.summary, run.tasks)
        + _tasks_section(run.tasks)
        + _errors_section(run.error_groups, anchors)
        + _sample_section(run, images, run_tasks(run), side, anchors)
        + f"<footer>Generated {_e(generated_at.strftime('%Y-%m-%d %H:%M UTC'))} by <code>python -m pipelines.report</code>."
        " Self-contained: no scripts, no external resources; model output is shown as text.</footer>"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>Run report · {_e(run.location)}</title><style>{STYLE}</style></head>"
        f'<body><main style="--thumb: {side + 2}px">{body}</main></body></html>\n'
    )
