"""RunTasks on a scripted engine (engine/fake.py): admission, the retry ladder, bundle ends, engine death, errors.

The DoFn's methods are driven as Beam drives them (setup, start_bundle,
process..., finish_bundle, teardown); the last test runs it in a pipeline.
The real engine's side of the same behaviour: tests/test_engine_faults.py,
tests/test_engine_isolation.py.
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from typing import Any, Iterable, Sequence

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam import pvalue
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue
from PIL import Image

from engine.api import EngineDeadError, EngineRequest, EngineSettings, EngineStopped
from engine.fake import Answer, FakeEngine, Script
from engine.prompts import Sampling
from engine.registry import EngineRegistry, build_engine
from library.metadata import ItemValues
from schemas.records import ErrorRecord, ImageItem, ItemInfo, ItemRef, RunInfo, Stage, TaskCompletion
from schemas.tables import RESULTS_SCHEMA
from tasks.builtin import BUILTIN_TASKS
from tasks.task import Task
from transforms.parse import ParseCompletions
from transforms.run_tasks import RunTasks, image_key
from transforms.summary import TallyFn, outcome, tally_result

SETTINGS = EngineSettings(model_path="/models/fake", engine_args={}, max_in_flight=8, structured_output=True)
TASKS = [BUILTIN_TASKS["caption"], BUILTIN_TASKS["detect"]]
BOXES = '[{"box_2d": [100, 200, 500, 600], "label": "cat"}]'
NOT_BOXES = "I see a cat."


def script(**answers: Any) -> dict[str, Any]:
    """Each named task's answer(s), for its first request and every rung of its retry ladder."""
    table: dict[str, Any] = {}
    for name, answer in answers.items():
        task = BUILTIN_TASKS[name]
        for attempt in range(len(task.retries) + 1):
            table.setdefault(task.request(ItemValues(None), attempt).instruction, answer)
    return table


def item(number: int, tasks: Sequence[str] = ()) -> ImageItem:
    info = ItemInfo(ItemRef.make(f"/data/{number}.png"), width=64, height=48, content_hash=f"hash{number}")
    return ImageItem(info, Image.new("RGB", (64, 48)), tuple(tasks))


class DrivenStage:
    """One RunTasks with its own registry of fake engines, driven as a runner drives a DoFn."""

    def __init__(
        self, engine_script: Script, tasks=TASKS, registry: EngineRegistry | None = None,
        settings: EngineSettings = SETTINGS, max_retries: int | None = None, **engine_args: Any,
    ):
        if registry is None:
            registry = EngineRegistry(lambda settings: FakeEngine(engine_script, **engine_args), idle_s=0)
        self.registry = registry
        self.dofn = RunTasks(settings, tasks, progress_interval_s=0, engines=lambda: self.registry, max_retries=max_retries)
        self.dofn.setup()

    @property
    def engine(self) -> FakeEngine:
        engine = self.dofn._engine
        assert isinstance(engine, FakeEngine)
        return engine

    def bundle(self, items: Iterable[ImageItem]) -> tuple[list[Any], list[Any]]:
        """(outputs while processing, outputs of finish_bundle), unwrapped."""
        self.dofn.start_bundle()
        during = [out for element in items for out in self.dofn.process(element, GlobalWindow(), MIN_TIMESTAMP)]
        return _values(during), _values(self.dofn.finish_bundle())


def _values(outputs: Iterable[Any]) -> list[Any]:
    values = []
    for output in outputs:
        if isinstance(output, pvalue.TaggedOutput):
            output = output.value
        if isinstance(output, WindowedValue):  # made outside process (finish_bundle): it carries its item's window
            assert list(output.windows) == [GlobalWindow()], output
            output = output.value
        values.append(output)
    return values


def test_all_tasks_of_an_item_are_admitted_together_and_answered():
    stage = DrivenStage(script(caption=Answer("a cat", prompt_tokens=180, generated_tokens=3, cached_tokens=128), detect=Answer(BOXES)))
    during, at_end = stage.bundle([item(1), item(2)])
    assert at_end == []  # every answer came while the bundle ran
    assert [(key, len(requests)) for key, requests in stage.engine.groups] == [(image_key(item(1)), 2), (image_key(item(2)), 2)]
    caption = next(value for value in during if value.task == "caption")
    assert isinstance(caption, TaskCompletion)
    assert (caption.text, caption.prompt_tokens, caption.generated_tokens, caption.cached_tokens, caption.attempts) == ("a cat", 180, 3, 128, 1)
    assert sorted((value.info.content_hash, value.task) for value in during) == [
        ("hash1", "caption"), ("hash1", "detect"), ("hash2", "caption"), ("hash2", "detect")]
    assert stage.engine.preprocessing() == (4, 2)


def test_an_items_own_task_list_is_what_is_submitted():
    stage = DrivenStage(script(caption=Answer("a cat"), detect=Answer(BOXES)))
    during, _ = stage.bundle([item(1, tasks=("detect",))])
    assert [value.task for value in during] == ["detect"] and len(stage.engine.groups[0][1]) == 1


def test_finish_bundle_waits_for_every_outstanding_answer():
    stage = DrivenStage(script(caption=Answer("slow", delay_s=0.2), detect=Answer(BOXES, delay_s=0.05)))
    started = time.monotonic()
    during, at_end = stage.bundle([item(1), item(2)])
    assert during == [] and len(at_end) == 4  # answered after process returned: emitted at the bundle's end
    assert time.monotonic() - started >= 0.2


def test_a_failing_answer_is_asked_again_and_a_later_rung_settles_it():
    stage = DrivenStage(script(caption=Answer("a cat"), detect=[Answer(NOT_BOXES), Answer(BOXES)]))
    during, at_end = stage.bundle([item(1)])
    [detect] = [value for value in during + at_end if value.task == "detect"]
    assert (detect.text, detect.attempts) == (BOXES, 2)
    rung = BUILTIN_TASKS["detect"].request(ItemValues(None), 1)
    assert stage.engine.groups[-1] == (image_key(item(1)), (rung,))  # the retry: the same image, the rung's request


def test_an_answer_failing_every_rung_goes_on_with_its_last_attempt():
    """The parse stage turns it into an error row with the raw text (tests/test_engine_faults.py, end to end)."""
    stage = DrivenStage(script(caption=Answer("a cat"), detect=Answer(NOT_BOXES)))
    during, at_end = stage.bundle([item(1)])
    [detect] = [value for value in during + at_end if value.task == "detect"]
    ladder = BUILTIN_TASKS["detect"].retries
    assert (detect.text, detect.attempts) == (NOT_BOXES, len(ladder) + 1)
    assert detect.instruction == BUILTIN_TASKS["detect"].request(ItemValues(None), len(ladder)).instruction


@pytest.mark.parametrize("max_retries", [0, 1, 5])
def test_max_retries_cuts_every_ladder_and_the_last_answer_goes_on(max_retries):
    """--max_retries N: a failing parse and a degenerate prose answer are re-asked at most N times (never
    beyond the task's own ladder); the answer then goes on as it is (parse error row / flagged result)."""
    stage = DrivenStage(script(caption=Answer(LOOP, "length", generated_tokens=128), detect=Answer(NOT_BOXES)), max_retries=max_retries)
    during, at_end = stage.bundle([item(1)])
    done = {value.task: value for value in during + at_end}
    for task in ("caption", "detect"):
        assert done[task].attempts == 1 + min(max_retries, len(BUILTIN_TASKS[task].retries)), task
    assert sum(len(requests) for _, requests in stage.engine.groups) == sum(d.attempts for d in done.values())  # no request more
    assert "truncated" in done["caption"].quality_flags and done["detect"].text == NOT_BOXES


def test_a_request_the_engine_rejects_becomes_an_engine_error_row_for_that_task_only():
    stage = DrivenStage(script(caption=Answer("a cat"), detect=Answer(error=ValueError("prompt longer than max_model_len"))))
    during, at_end = stage.bundle([item(1)])
    [error] = [value for value in during + at_end if isinstance(value, ErrorRecord)]
    assert (error.task, error.stage, error.error_type) == ("detect", Stage.ENGINE, "ValueError")
    assert "max_model_len" in error.message
    assert [value.task for value in during + at_end if isinstance(value, TaskCompletion)] == ["caption"]


def test_a_task_whose_value_the_item_lacks_becomes_a_prompt_error_row_and_the_others_run():
    ask = Task(name="ask", instruction="What is {question}?")
    stage = DrivenStage(script(caption=Answer("a cat")), tasks=[BUILTIN_TASKS["caption"], ask])
    during, _ = stage.bundle([item(1)])
    [error] = [value for value in during if isinstance(value, ErrorRecord)]
    assert (error.task, error.stage) == ("ask", Stage.PROMPT)
    assert [value.task for value in during if isinstance(value, TaskCompletion)] == ["caption"]


def test_an_engine_death_fails_the_bundle_and_its_retry_runs_on_a_new_engine():
    killed = {"first": True}

    def answers(request):
        if killed.pop("first", False):
            return Answer(kill=True, delay_s=0.05)
        return Answer(BOXES if "box" in request.instruction.lower() else "a cat")

    stage = DrivenStage(answers)
    with pytest.raises(EngineDeadError):
        stage.bundle([item(1), item(2)])
    dead = stage.engine
    assert dead.failed
    during, at_end = stage.bundle([item(1), item(2)])  # the runner retries the bundle
    assert len(during + at_end) == 4 and stage.engine is not dead
    assert dead.closed and stage.registry.live == 1  # the registry closed the engine it replaced


def test_an_item_waits_for_room_and_is_admitted_whole():
    """max_in_flight 2: an item's two tasks wait until both fit, and go in as one group."""
    stage = DrivenStage(script(caption=Answer("a cat", delay_s=0.1), detect=Answer(BOXES, delay_s=0.1)), max_in_flight=2)
    during, at_end = stage.bundle([item(1), item(2), item(3)])
    assert len(during + at_end) == 6
    assert [len(requests) for _, requests in stage.engine.groups] == [2, 2, 2]


def test_teardown_releases_the_engine_and_the_last_release_closes_it():
    registry = EngineRegistry(lambda settings: FakeEngine(script(caption=Answer("a cat"), detect=Answer(BOXES))), idle_s=0)
    first, second = DrivenStage({}, registry=registry), DrivenStage({}, registry=registry)
    assert registry.live == 0  # acquired at the first item, not in setup
    first.bundle([item(1)])
    second.bundle([item(2)])
    engine = first.engine
    assert second.engine is engine and registry.live == 1  # one engine per settings, shared
    first.dofn.teardown()
    assert not engine.closed  # the other instance still holds it
    second.dofn.teardown()
    assert engine.closed and registry.live == 0


def test_a_stage_that_gets_no_item_starts_no_engine():
    """Pages their text layers answer never reach the stage: a worker with nothing else to do starts no engine."""
    registry = EngineRegistry(lambda settings: FakeEngine({}), idle_s=0)
    stage = DrivenStage({}, registry=registry)
    assert stage.bundle([]) == ([], []) and registry.live == 0
    stage.dofn.teardown()
    assert registry.live == 0


_PIPELINE_ENGINES = EngineRegistry(lambda settings: FakeEngine(script(caption=Answer("a cat"), detect=Answer(BOXES))), idle_s=0)


def _pipeline_engines() -> EngineRegistry:
    return _PIPELINE_ENGINES


def test_in_a_pipeline_beam_tears_the_stage_down_and_its_engine_is_closed():
    # A module-level function: Beam pickles the DoFn, and a registry (locks, engines) does not pickle.
    with beam.Pipeline() as pipeline:
        outputs = (
            pipeline
            | beam.Create([item(1), item(2), item(3)])
            | beam.ParDo(RunTasks(SETTINGS, TASKS, progress_interval_s=0, engines=_pipeline_engines)).with_outputs("errors", main="main")
        )
        completions = outputs.main | beam.Map(lambda completion: (completion.info.content_hash, completion.task))
        assert_that(completions, equal_to(
            [(f"hash{n}", task) for n in (1, 2, 3) for task in ("caption", "detect")]))
    assert _PIPELINE_ENGINES.live == 0  # teardown released it, and nothing else held it


def test_an_idle_engine_is_kept_for_the_next_holder_then_closed():
    built: list[FakeEngine] = []
    registry = EngineRegistry(lambda settings: built.append(FakeEngine({})) or built[-1], idle_s=0.2)
    engine = registry.acquire(SETTINGS)
    registry.release(engine)
    assert registry.acquire(SETTINGS) is engine and len(built) == 1  # back within idle_s: the same engine
    registry.release(engine)
    deadline = time.monotonic() + 5
    while not engine.closed:
        assert time.monotonic() < deadline, "the idle engine was never closed"
        time.sleep(0.02)
    assert registry.live == 0 and registry.acquire(SETTINGS) is not engine


def test_without_an_idle_limit_only_a_failed_engine_is_closed():
    registry = EngineRegistry(lambda settings: FakeEngine({"q": Answer(kill=True)}), idle_s=None)
    engine = registry.acquire(SETTINGS)
    registry.release(engine)
    assert registry.acquire(SETTINGS) is engine and not engine.closed  # kept while the process lives
    with pytest.raises(EngineDeadError):
        engine.submit(Image.new("RGB", (4, 4)), "k", [EngineRequest("q", max_tokens=4, sampling=Sampling())])[0].result()
    registry.release(engine)
    assert engine.closed and registry.live == 0


def test_stop_all_cancels_outstanding_work_and_the_next_acquire_builds_a_new_engine():
    registry = EngineRegistry(lambda settings: FakeEngine({"q": Answer("a", delay_s=5)}), idle_s=0)
    engine = registry.acquire(SETTINGS)
    [future] = engine.submit(Image.new("RGB", (4, 4)), "k", [EngineRequest("q", max_tokens=4, sampling=Sampling())])
    stopper = threading.Thread(target=registry.stop_all, args=("run interrupted by SIGINT",))
    stopper.start()
    stopper.join()
    assert isinstance(future.exception(timeout=1), EngineStopped) and engine.failed
    assert registry.acquire(SETTINGS) is not engine and engine.closed


def test_a_test_without_the_engine_mark_may_build_a_fake_but_not_a_real_engine():
    """tests/conftest.py: only building a VisionEngine trips the guard (every test above ran a fake)."""
    with pytest.raises(RuntimeError, match="mark it @pytest.mark.engine"):
        build_engine(SETTINGS)


def test_a_layout_answer_climbs_the_ladder_and_lands_as_blocks_read_back_from_parquet(tmp_path):
    """Scripted, since the random model answers `[]`: a bad category is re-asked, the good answer's blocks are kept."""
    layout = BUILTIN_TASKS["layout"]
    blocks = ('[{"box_2d": [0, 0, 100, 1000], "category": "title", "text": "Annual report"},'
              ' {"box_2d": [120, 0, 900, 1000], "category": "text", "text": "Revenue grew."}]')
    stage = DrivenStage(script(layout=[Answer('[{"box_2d": [0, 0, 10, 10], "category": "poem", "text": "x"}]'),
                                       Answer(blocks)]), tasks=[layout])
    during, at_end = stage.bundle([item(1)])
    [completion] = during + at_end
    assert completion.attempts == 2
    [row] = list(ParseCompletions([layout], RunInfo("run-1", "model-x", "v1")).process(completion))
    path = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist([row], schema=RESULTS_SCHEMA), path)
    [back] = pq.read_table(path).to_pylist()
    assert [(b["index"], b["category"], b["text"]) for b in back["blocks"]] == [
        (0, "title", "Annual report"), (1, "text", "Revenue grew.")]
    assert back["blocks"][1]["box_px"] == {"xmin": 0, "ymin": 6, "xmax": 64, "ymax": 43}  # 0-1000 -> 64 x 48 pixels
    assert back["text"] == "# Annual report\n\nRevenue grew." and back["detections"] is None


LOOP = "Chapter 1\n" + "the " * 300  # a greedy loop, cut by max_tokens
PAGE = "Valgrind is an instrumentation framework for building dynamic analysis tools.\n"


def test_a_degenerate_text_answer_climbs_the_guarded_ladder_and_what_stays_degenerate_is_kept_flagged(tmp_path):
    """ocr: looped and cut, then empty, then a sound answer on the longer rung; caption: looped on every rung.
    Through the parse stage to Parquet: flags, confidence and language as written, and the summary's counts."""
    ocr, caption = BUILTIN_TASKS["ocr"], BUILTIN_TASKS["caption"]
    tokens = {"prompt_tokens": 1000, "cached_tokens": 992}
    settings = dataclasses.replace(SETTINGS, engine_args={"max_model_len": 4096})
    stage = DrivenStage(script(
        ocr=[Answer(LOOP, "length", generated_tokens=2048, logprob_sum=-2048 * 0.05, **tokens),
             Answer("", "stop", generated_tokens=1, logprob_sum=-0.1, **tokens),
             Answer(PAGE, "stop", generated_tokens=16, logprob_sum=16 * math.log(0.8), **tokens)],
        caption=Answer(LOOP, "length", generated_tokens=128, logprob_sum=-128 * 0.02, **tokens),
    ), tasks=[ocr, caption], settings=settings)
    during, at_end = stage.bundle([item(1)])
    done = {value.task: value for value in during + at_end}
    assert (done["ocr"].text, done["ocr"].attempts, done["ocr"].quality_flags) == (PAGE, 3, ("retried",))
    assert done["ocr"].confidence == pytest.approx(0.8)
    assert (done["caption"].attempts, done["caption"].quality_flags) == (3, ("truncated", "looped", "retried"))
    # Every retry went out as its own admission of the same image: the rung's request.
    ocr_requests = [requests[0] for _, requests in stage.engine.groups if requests[0].instruction == ocr.instruction]
    first, sampled, longer = ocr_requests
    assert first.sampling.repetition_penalty is None and sampled.sampling.temperature > 0
    assert sampled.sampling.repetition_penalty > 1 and sampled.max_tokens == ocr.max_tokens
    assert longer.sampling.temperature == 0 and longer.max_tokens == 4096 - 1000  # what the context leaves
    assert all(key == image_key(item(1)) for key, _ in stage.engine.groups)

    parse = ParseCompletions([ocr, caption], RunInfo("run-1", "model-x", "v1"))
    rows = [row for task in ("ocr", "caption") for row in parse.process(done[task])]
    path = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), path)
    back = {row["task"]: row for row in pq.read_table(path).to_pylist()}
    assert back["ocr"]["quality_flags"] == ["retried"] and back["ocr"]["language"] == "en"
    assert back["ocr"]["confidence"] == pytest.approx(0.8, abs=1e-6) and back["ocr"]["truncated"] is False
    assert back["caption"]["quality_flags"] == ["truncated", "looped", "retried"] and back["caption"]["text"] == LOOP.strip()
    assert back["caption"]["confidence"] == pytest.approx(math.exp(-0.02), abs=1e-6)

    tally = TallyFn().add_input(TallyFn().create_accumulator(), tally_result(back["ocr"]))
    tally = TallyFn().add_input(tally, tally_result(back["caption"]))
    assert (tally["flagged_results"], tally["quality_flag_retried"], tally["quality_flag_looped"]) == (1, 2, 1)
    counted = {flagged: outcome(1, 1, 2, 0, 0, 0, True, 0.25, flagged_results=flagged) for flagged in (0, 1)}
    assert counted[0]["state"] == "SUCCEEDED"  # flagged answers are kept, not failed (the default)
    assert counted[1]["state"] == "FAILED" and counted[1]["error_budget"]["failed_task_outcomes"] == 1  # --count_flagged_as_errors


def test_an_empty_answer_of_another_kind_is_no_degenerate_retry():
    """An empty boxes list is an answer: only prose answers climb the ladder for being degenerate."""
    stage = DrivenStage(script(caption=Answer("a cat"), detect=Answer("[]")))
    during, _ = stage.bundle([item(1)])
    assert {value.task: (value.attempts, value.quality_flags) for value in during} == {"caption": (1, ()), "detect": (1, ())}


def test_a_json_answer_gets_a_confidence_per_field_through_to_parquet(tmp_path):
    """The engine's tokens (text, log-probability) give each top-level field its own figure; a retry's answer is the
    one scored; a text task and an answer without tokens get none."""
    from tasks.kinds import JSON

    schema = {"type": "object", "properties": {"number": {"type": "string"}, "total": {"type": "number"}}, "required": ["number", "total"]}
    invoice = Task("invoice", "Extract the invoice.", JSON, schema=schema, retries=JSON.retries("Extract the invoice.", schema))
    answer = 'Sure.\n```json\n{"number": "INV-7", "total": 12.5}\n```'
    unsure_at = answer.index("12.5")
    pieces = [answer[i:i + 4] for i in range(0, len(answer), 4)] + ["<turn|>"]  # the stop token, outside the text
    tokens = tuple((piece, -1.5 if i * 4 < unsure_at + 4 and i * 4 + len(piece) > unsure_at else -0.02)
                   for i, piece in enumerate(pieces))
    stage = DrivenStage({
        invoice.instruction: [  # the first rung re-asks the same instruction, sampled
            Answer('{"number": 7}', tokens=(('{"number": 7}', -0.1),)),  # fails the schema: retried
            Answer(answer, generated_tokens=len(tokens), logprob_sum=sum(lp for _, lp in tokens), tokens=tokens)],
        **script(caption=Answer("a cat", tokens=(("a", -0.1), (" cat", -0.1)))),
    }, tasks=[invoice, BUILTIN_TASKS["caption"]])
    during, at_end = stage.bundle([item(1)])
    done = {value.task: value for value in during + at_end}
    assert done["invoice"].attempts == 2
    assert done["invoice"].field_confidence == (("number", pytest.approx(math.exp(-0.02))), ("total", pytest.approx(math.exp(-1.5))))
    assert done["caption"].field_confidence is None

    parse = ParseCompletions([invoice, BUILTIN_TASKS["caption"]], RunInfo("run-1", "model-x", "v1"))
    rows = [row for task in ("invoice", "caption") for row in parse.process(done[task])]
    path = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULTS_SCHEMA), path)
    back = {row["task"]: row for row in pq.read_table(path).to_pylist()}
    assert [(f["field"], round(f["confidence"], 4)) for f in back["invoice"]["field_confidence"]] == [
        ("number", round(math.exp(-0.02), 4)), ("total", round(math.exp(-1.5), 4))]
    assert back["invoice"]["data"] == '{"number":"INV-7","total":12.5}' and back["caption"]["field_confidence"] is None
    assert pq.read_schema(path).field("field_confidence").type == pa.list_(pa.struct([("field", pa.string()), ("confidence", pa.float32())]))
