"""Output kinds: every registered kind handles every hook, task files take every kind, and the layout kind's parsing."""
from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import pathlib

import pyarrow as pa
import pytest

from schemas.records import Block, ItemInfo, ItemRef, ParsedAnswer, RunInfo, TaskCompletion
from schemas.tables import RESULTS_SCHEMA, result_row
from tasks.answers import CutOffAnswer, DetectionParseError
from tasks.builtin import BUILTIN_TASKS, DEFAULT_TASKS
from tasks.kinds import BOXES, KINDS, LAYOUT, kind_of
from tasks.kinds.layout import CATEGORIES, LayoutParseError, markdown, parse_blocks
from tasks.task import Task
from tasks.task_file import parse_task_file
from transforms.parse import ParseCompletions
from transforms.run_tasks import needs_retry

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
INFO = ItemInfo(ItemRef.make("/data/page.png"), width=2000, height=1000, content_hash="abc")
RUN = RunInfo("run-1", "tiny", "v1")
# One answer each kind parses: the boxes and layout lists are also valid text and not a json document's.
ANSWERS = {
    "text": "Hello.",
    "boxes": '[{"box_2d": [100, 200, 500, 600], "label": "cat"}]',
    "json": '{"n": 7}',
    "layout": '[{"box_2d": [0, 0, 100, 1000], "category": "title", "text": "Report"}]',
}
KIND_COLUMNS = {kind.column for kind in KINDS.values() if kind.column}


def completion(task: str, text: str, finish: str = "stop", attempts: int = 1) -> TaskCompletion:
    return TaskCompletion(INFO, task, text, finish, prompt_tokens=10, generated_tokens=5, cached_tokens=0,
                          latency_s=0.1, attempts=attempts)


# ---------------------------------------------------------------- the registry is complete


@pytest.mark.parametrize("name", list(KINDS))
def test_every_registered_kind_implements_every_hook(name):
    kind = KINDS[name]
    assert not inspect.isabstract(type(kind)) and kind.name == name
    assert isinstance(kind.max_tokens, int) and kind.max_tokens > 0 and isinstance(kind.validated, bool)
    assert kind.column is None or kind.column in RESULTS_SCHEMA.names
    schema = SCHEMA if kind.needs_schema else None
    constraint = kind.constraint(schema)
    assert constraint is None or constraint.json_schema is not None
    # A validated kind has a ladder whose last rung restates the format; a prose kind's guards against
    # repetition and its last rung has a larger budget (for degenerate answers); any other never retries.
    ladder = kind.retries("Look.", schema)
    if kind.validated:
        assert len(ladder) == 2 and ladder[-1].instruction.startswith("Look.\n\n")
    elif kind.prose:
        assert ladder and all(rung.repetition_penalty for rung in ladder) and ladder[-1].max_tokens_scale > 1
    else:
        assert ladder == ()
    parsed = kind.parse(ANSWERS[name], schema, INFO.width, INFO.height, False)
    row = result_row(completion(f"t_{name}", ANSWERS[name]), RUN, parsed)
    pa.Table.from_pylist([row], schema=RESULTS_SCHEMA)  # the row fits the table
    # It fills its own column and no other kind's, and the row reads back as its kind.
    assert {column for column in KIND_COLUMNS if row[column] is not None} == ({kind.column} - {None})
    assert kind_of(row) is kind and isinstance(kind.answer_text(row), str)
    regions, document = kind.regions(row), kind.document(row)
    assert regions is None or all({"label", "box", "box_px"} <= set(region) for region in regions)
    assert document is None or json.dumps(document)


def _kind_tests(path: pathlib.Path) -> list[str]:
    """Comparisons that ask which kind a task has: `output is BOXES`, `kind.name == "json"`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        members = {name.upper() for name in KINDS}  # TEXT, BOXES, ... as instances or as enum members
        instance = any((isinstance(o, ast.Name) and o.id in members) or (isinstance(o, ast.Attribute) and o.attr in members)
                       for o in operands)
        named = any(isinstance(o, ast.Constant) and o.value in KINDS for o in operands) and any(
            isinstance(o, ast.Attribute) and o.attr in ("name", "output") for o in operands)
        if instance or named:
            found.append(f"{path}:{node.lineno}")
    return found


def test_nothing_outside_the_kind_modules_asks_which_kind_it_has():
    root = pathlib.Path(__file__).resolve().parent.parent
    sources = [path for path in root.glob("*/**/*.py")
               if path.relative_to(root).parts[0] not in ("tests", ".venv") and "kinds" not in path.parts]
    assert sources and [found for path in sources for found in _kind_tests(path)] == []


@pytest.mark.parametrize("name", list(KINDS))
def test_task_files_take_every_kind_with_its_defaults(name):
    kind = KINDS[name]
    schema = "\n    schema: {type: object}" if kind.needs_schema else ""
    [task] = parse_task_file(f"tasks:\n  - name: mine\n    instruction: Look.\n    output: {name}{schema}\n", "t.yaml")
    assert (task.output, task.max_tokens, task.retries) == (
        kind, kind.max_tokens, kind.retries("Look.", task.schema))
    assert task.request(values=None).constraint == kind.constraint(task.schema)  # type: ignore[arg-type]


def test_the_layout_task_is_built_in_but_not_run_by_default():
    layout = BUILTIN_TASKS["layout"]
    assert layout.output is LAYOUT and layout.max_tokens == LAYOUT.max_tokens and "layout" not in DEFAULT_TASKS
    assert layout.request(None).constraint.json_schema["items"]["properties"]["category"]["enum"] == list(CATEGORIES)  # type: ignore[arg-type,union-attr]


# ---------------------------------------------------------------- parsed once


def test_the_engine_stage_reads_an_answer_once_and_the_parse_stage_routes_it():
    detect = BUILTIN_TASKS["detect"]
    read = detect.read(completion("detect", "<|channel>thought\nhm<channel|>no boxes here<turn|>"))
    assert read.thought == "hm" and read.parsed is None and isinstance(read.parse_error, DetectionParseError)
    assert needs_retry(detect, read) and not needs_retry(detect, dataclasses.replace(read, attempts=len(detect.retries) + 1))
    stage = ParseCompletions([detect], RUN)
    [error] = stage.process(read)
    assert error.value.message == "no JSON list of boxes in the answer"
    # A completion read before carries its parse: the stage does not parse again (this text would not parse).
    carried = dataclasses.replace(read, parse_error=None, parsed=ParsedAnswer("x", ()))
    [row] = stage.process(carried)
    assert row["detections"] == [] and row["thought"] == "hm"


# ---------------------------------------------------------------- layout answers

WELL_FORMED = json.dumps([
    {"box_2d": [20, 100, 80, 900], "category": "title", "text": "Quarterly report"},
    {"box_2d": [100, 100, 400, 900], "category": "Text", "text": "Sales rose."},
    {"box_2d": [420, 100, 600, 900], "category": "table", "text": "| a | b |\n|---|---|\n| 1 | 2 |"},
    {"box_2d": [950, 100, 990, 900], "category": "footer", "text": "page 3"},
])


def test_layout_blocks_in_reading_order_with_boxes_in_pixels():
    blocks = parse_blocks(WELL_FORMED, width=2000, height=1000)
    assert [(b.index, b.category) for b in blocks] == [(0, "title"), (1, "text"), (2, "table"), (3, "footer")]
    assert blocks[0].box_1000 == (20, 100, 80, 900) and blocks[0].box_norm == pytest.approx((0.02, 0.1, 0.08, 0.9))
    assert blocks[0].box_px == (20, 200, 80, 1800)  # y scales with the height (1000), x with the width (2000)


def test_layout_answers_in_prose_and_fences_are_found():
    fenced = f"Here is the layout:\n```json\n{WELL_FORMED}\n```\nDone."
    assert parse_blocks(fenced, 100, 100) == parse_blocks(WELL_FORMED, 100, 100)


def test_a_truncated_layout_keeps_its_complete_blocks():
    cut = WELL_FORMED[: WELL_FORMED.index('"Sales') + 4]
    assert [b.text for b in parse_blocks(cut, 100, 100, truncated=True)] == ["Quarterly report"]
    assert parse_blocks(cut[: cut.index('"Quarterly') + 4], 100, 100, truncated=True) == []  # as a cut box list
    with pytest.raises(CutOffAnswer, match=r"max_tokens=6208 before any JSON began; raise this task's max_tokens"):
        BUILTIN_TASKS["layout"].parse("The page shows a report with", 100, 100, True)


def test_layout_boxes_are_clipped_and_ordered_and_a_box_without_area_keeps_its_text():
    [clipped, flat] = parse_blocks(json.dumps([
        {"box_2d": [1400, 600, -20, 100], "category": "figure", "text": ""},
        {"box_2d": [300, 100, 300, 900], "category": "text", "text": "a rule"},
    ]), 100, 100)
    assert clipped.box_1000 == (0, 100, 1000, 600) and clipped.box_px == (0, 10, 100, 60)
    assert (flat.text, flat.box_1000, flat.box_norm, flat.box_px) == ("a rule", None, None, None)


@pytest.mark.parametrize("answer, message", [
    ('[{"box_2d": [1, 2, 3, 4], "category": "sidebar", "text": "x"}]', "entry 0: category 'sidebar' is not one of text, title"),
    ('[{"box_2d": [1, 2, 3, 4], "text": "x"}]', "entry 0: category None is not one of"),
    ('[{"box_2d": [1, 2, 3], "category": "text", "text": "x"}]', "entry 0: box_2d must be a list of 4 numbers"),
    ('[{"box_2d": [1, 2, 3, 4], "category": "text", "text": 5}]', "entry 0: text must be a string"),
    ("The page is blank.", "no JSON list of blocks in the answer"),
])
def test_unusable_layouts_are_refused_with_the_reason(answer, message):
    with pytest.raises(LayoutParseError, match=message):
        parse_blocks(answer, 100, 100)


def test_markdown_of_blocks_reads_like_the_markdown_task():
    blocks = parse_blocks(WELL_FORMED, 100, 100) + [Block(4, "formula", "E = mc^2", None, None, None)]
    assert markdown(list(reversed(blocks))) == (
        "# Quarterly report\n\nSales rose.\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n$$\nE = mc^2\n$$"
    )  # reading order whatever the list order; the running footer left out
    assert markdown([]) == ""


def test_a_layout_row_has_blocks_and_its_markdown_as_text():
    parsed = BUILTIN_TASKS["layout"].parse(WELL_FORMED, 2000, 1000, False)
    row = result_row(completion("layout", WELL_FORMED), RUN, parsed)
    assert row["text"] == markdown(parsed.blocks) and row["detections"] is None and row["data"] is None  # type: ignore[arg-type]
    [read_back] = pa.Table.from_pylist([row], schema=RESULTS_SCHEMA).to_pylist()
    assert read_back["blocks"][0] == {"index": 0, "category": "title", "text": "Quarterly report",
                                      "box_1000": {"ymin": 20, "xmin": 100, "ymax": 80, "xmax": 900},
                                      "box": pytest.approx({"ymin": 0.02, "xmin": 0.1, "ymax": 0.08, "xmax": 0.9}),
                                      "box_px": {"ymin": 20, "xmin": 200, "ymax": 80, "xmax": 1800}}
    assert [region["label"] for region in LAYOUT.regions(read_back)] == ["title", "text", "table", "footer"]  # type: ignore[union-attr]
    assert BOXES.regions({"detections": None}) == []


# ---------------------------------------------------------------- thoughts that leave no answer


@pytest.mark.parametrize("task", list(BUILTIN_TASKS))
def test_an_answer_left_empty_by_a_thought_that_ran_out_of_tokens_is_an_error_row(task):
    definition = BUILTIN_TASKS[task]
    cut = completion(task, "<|channel>thought\nFirst I list the lines: one, two", finish="length")
    read = definition.read(cut)
    assert read.parsed is None and isinstance(read.parse_error, CutOffAnswer)
    assert read.thought == "First I list the lines: one, two"
    [error] = ParseCompletions([definition], RUN).process(read)
    assert f"--max_tokens {task}=N" in error.value.message and "thought" in error.value.message
    # Only the length limit makes an empty answer an error: a finished empty answer is an empty page.
    if not definition.output.validated:
        assert definition.read(completion(task, "<|channel>thought\nnothing here<channel|>")).parsed.text == ""
