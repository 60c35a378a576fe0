"""The designs under test, each run in its own process by `benchmarks.run`.

    python -m benchmarks.variants NAME SPEC.json OUT.json   (internal: benchmarks.run calls it)

One process per variant: every engine starts from the same state, OpenMP
threads are bound once, and the process's peak RSS is that variant's alone.
Each variant loads its engine (or starts its server) before the clock starts,
so the figures compare steady-state throughput, not start-up.

- raw: one `vllm.LLM.generate` over every prompt, images decoded beforehand.
- pipeline: `pipelines.vision_batch.run` (files -> Parquet) on the local runner.
- text-first: the pipeline with the instruction before the image (ablation).
- runinference: Beam RunInference, a ModelHandler calling `llm.generate(batch)`.
- server: `vllm serve` + OpenAI client with base64 image parts (benchmarks/server.py).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any, Callable, Iterable, Optional, Sequence

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks.measure import StepTimer, TaskRecord, own_peak_rss_bytes, timed
from benchmarks.workload import Workload, decode_files, image_files, instruction
from pipelines import vision_batch
from pipelines.options import JobConfig
from pipelines.runner import make_runner
from schemas.records import ImageItem, TaskCompletion
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from transforms import decode, engine, parse, sources
from transforms.errors import ERRORS_TAG
from transforms.engine import ENGINES, EngineSettings, engine_prompt, sampling_params
from transforms.run_tasks import image_key
from transforms.metadata import ItemValues
from transforms.prompts import render_prompt
from transforms.tasks import Task
from transforms.sinks import WriteTable, to_error_row


# ---------------------------------------------------------------- shared helpers


def load_llm(settings: EngineSettings) -> Any:
    """`vllm.LLM` in-process with exactly the pipeline's engine arguments."""
    engine.prepare_process(settings)  # the process set-up VisionEngine makes
    from vllm import LLM

    return LLM(model=settings.model_path, **settings.engine_args)


def prompt_texts(llm: Any, tasks: Sequence[Task], image_first: bool = True) -> dict[str, str]:
    tokenizer = llm.get_tokenizer()
    return {task.name: render_prompt(instruction(task), tokenizer.apply_chat_template, image_first) for task in tasks}


def record(image: str, task: str, output: Any) -> TaskRecord:
    """A TaskRecord from a vLLM RequestOutput."""
    return TaskRecord(
        image=image,
        task=task,
        prompt_tokens=len(output.prompt_token_ids or ()),
        generated_tokens=len(output.outputs[0].token_ids),
        cached_tokens=int(output.num_cached_tokens or 0),
    )


def parquet_records(output: str) -> tuple[list[TaskRecord], int]:
    """Result rows as TaskRecords, and the number of per-task error rows, from a run's Parquet output."""
    columns = ["item_id", "task", "prompt_tokens", "generated_tokens", "cached_tokens"]
    results = pq.read_table(f"{output}/results", schema=RESULTS_SCHEMA, columns=columns).to_pylist()
    errors_dir = pathlib.Path(output, "errors")
    task_errors = 0
    if any(errors_dir.glob("*.parquet")):
        task_errors = sum(1 for row in pq.read_table(errors_dir, schema=ERRORS_SCHEMA, columns=["task"]).to_pylist() if row["task"])
    records = [
        TaskRecord(r["item_id"], r["task"], r["prompt_tokens"], r["generated_tokens"], r["cached_tokens"]) for r in results
    ]
    return records, task_errors


# ---------------------------------------------------------------- (a) raw engine ceiling


def run_raw(workload: Workload, out_dir: pathlib.Path, **_: Any) -> dict[str, Any]:
    settings = workload.engine_settings()
    specs = workload.specs()
    items = decode_files(image_files(workload.images))  # decoded before the clock: the ceiling excludes decode
    llm = load_llm(settings)
    texts = prompt_texts(llm, specs)
    prompts, params, keys = [], [], []
    for item in items:
        for spec in specs:
            request = spec.request(ItemValues(None))
            prompts.append(engine_prompt(texts[spec.name], item.image, image_key(item), request.vision_tokens))
            params.append(sampling_params(request, settings))
            keys.append((image_key(item), spec.name))
    timer = StepTimer(llm.llm_engine, settings.engine_args["max_num_seqs"])
    outputs, window = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    records = [record(key, task, output) for (key, task), output in zip(keys, outputs)]
    return {"items": len(items), "wall_s": window.wall_s, "cpu_s": window.cpu_s, "busy_s": timer.seconds, "records": records,
            "notes": {"engine_steps": timer.steps, "slot_occupancy": timer.occupancy}}


# ---------------------------------------------------------------- (b) this pipeline, (e) ablations


def _run_with_engine(settings: EngineSettings, output: str, run: Callable[[], Any]) -> dict[str, Any]:
    """Run a pipeline whose RunTasks finds `settings`' engine already loaded; busy time from VisionEngine."""
    vision_engine = ENGINES.acquire(settings)  # loaded before the clock; the run reuses it (same settings key)
    busy_before = vision_engine.busy_seconds
    timer = StepTimer(vision_engine._engine, settings.engine_args["max_num_seqs"])  # occupancy only; busy is the engine's own
    _, window = timed(run)
    records, task_errors = parquet_records(output)
    return {"items": len({r.image for r in records}), "wall_s": window.wall_s, "cpu_s": window.cpu_s,
            "busy_s": vision_engine.busy_seconds - busy_before, "records": records, "task_errors": task_errors,
            "notes": {"engine_steps": timer.steps, "slot_occupancy": timer.occupancy}}


def run_pipeline(workload: Workload, out_dir: pathlib.Path, **_: Any) -> dict[str, Any]:
    output = str(out_dir / "out")
    return _run_with_engine(workload.engine_settings(), output, lambda: vision_batch.run(workload.pipeline_argv(output)))


def run_text_first(workload: Workload, out_dir: pathlib.Path, **_: Any) -> dict[str, Any]:
    """The pipeline with the task text before the image: benchmark-only, so no user-facing option.

    Builds the same graph as `vision_batch.run` from the same command line,
    with only `EngineSettings.image_first` changed.
    """
    output = str(out_dir / "out")
    options = PipelineOptions(workload.pipeline_argv(output))
    config = JobConfig.from_options(options, workload.model_path, workload.model_id, True)
    config = dataclasses.replace(config, engine=workload.engine_settings(image_first=False))

    def run() -> None:
        pipeline = beam.Pipeline(runner=make_runner(options), options=options)
        vision_batch.build_pipeline(pipeline, config)
        pipeline.run().wait_until_finish()

    return _run_with_engine(config.engine, output, run)


# ---------------------------------------------------------------- (c) RunInference-style synchronous batches

_LLM: Any = None  # loaded before the clock; the handler's load_model hands it to RunInference


class VLLMBatchHandler(ModelHandler[tuple[ImageItem, Task], PredictionResult, Any]):
    """What Beam's model handlers do: one blocking `llm.generate(batch)` per BatchElements batch."""

    def __init__(self, settings: EngineSettings, texts: dict[str, str], batch_size: int):
        super().__init__(min_batch_size=batch_size, max_batch_size=batch_size)
        self._settings = settings
        self._texts = texts

    def load_model(self) -> Any:
        return _LLM

    def run_inference(
        self, batch: Sequence[tuple[ImageItem, Task]], model: Any, inference_args: Optional[dict[str, Any]] = None
    ) -> Iterable[PredictionResult]:
        requests = [spec.request(ItemValues(None)) for _, spec in batch]
        prompts = [
            engine_prompt(self._texts[spec.name], item.image, image_key(item), request.vision_tokens)
            for (item, spec), request in zip(batch, requests)
        ]
        params = [sampling_params(request, self._settings) for request in requests]
        outputs, window = timed(lambda: model.generate(prompts, params, use_tqdm=False), cpu_of=lambda: 0.0)
        return [PredictionResult(example, (output, window.wall_s)) for example, output in zip(batch, outputs)]

    def get_num_bytes(self, batch: Sequence[tuple[ImageItem, Task]]) -> int:
        # Beam's default pickles the whole batch (images included) just for a metric.
        return sum(item.image.width * item.image.height * 3 for item, _ in batch)


def _completion(result: PredictionResult) -> TaskCompletion:
    (item, spec), (output, seconds) = result.example, result.inference
    answer = output.outputs[0]
    return TaskCompletion(
        info=item.info, task=spec.name, text=answer.text, finish_reason=str(answer.finish_reason),
        prompt_tokens=len(output.prompt_token_ids or ()), generated_tokens=len(answer.token_ids),
        cached_tokens=int(output.num_cached_tokens or 0), latency_s=seconds,
    )


def run_runinference(workload: Workload, out_dir: pathlib.Path, batch_size: int = 0, **_: Any) -> dict[str, Any]:
    """Same sources, decode, parse and Parquet sink as the pipeline; RunInference in place of RunTasks."""
    global _LLM
    output = str(out_dir / "out")
    options = PipelineOptions(workload.pipeline_argv(output))
    config = JobConfig.from_options(options, workload.model_path, workload.model_id, True)
    _LLM = load_llm(config.engine)
    timer = StepTimer(_LLM.llm_engine, config.engine.engine_args["max_num_seqs"])
    # Default: as many requests per batch as the engine runs at once, whole images only.
    size = batch_size or config.engine.engine_args["max_num_seqs"] // len(config.tasks) * len(config.tasks)
    handler = VLLMBatchHandler(config.engine, prompt_texts(_LLM, config.tasks), size)

    def run() -> None:
        pipeline = beam.Pipeline(runner=make_runner(options), options=options)
        files, _ = pipeline | "MatchInputs" >> sources.MatchInputs(config.inputs, config.manifests, config.manifest_column)
        units = files | "PlanUnits" >> beam.ParDo(decode.PlanUnits(config.limits, config.shards))
        items = units | "FanOutUnits" >> beam.Reshuffle() | "DecodeUnits" >> beam.ParDo(
            decode.DecodeUnits(config.limits, config.shards)).with_outputs(ERRORS_TAG, main="items")
        parsed = (
            items.items
            | "PerTask" >> beam.FlatMap(lambda item: [(item, spec) for spec in config.tasks])
            | "RunInference" >> RunInference(handler)
            | "ToCompletion" >> beam.Map(_completion)
            | "Parse" >> beam.ParDo(parse.ParseCompletions(config.tasks, config.run)).with_outputs(
                ERRORS_TAG, main="rows")
        )
        parsed.rows | "WriteResults" >> WriteTable(config.output, "results", RESULTS_SCHEMA)
        (parsed[ERRORS_TAG] | "ErrorRows" >> beam.Map(to_error_row, config.run)
         | "WriteErrors" >> WriteTable(config.output, "errors", ERRORS_SCHEMA))
        pipeline.run().wait_until_finish()

    _, window = timed(run)
    records, task_errors = parquet_records(output)
    return {"items": len({r.image for r in records}), "wall_s": window.wall_s, "cpu_s": window.cpu_s,
            "busy_s": timer.seconds, "records": records,
            "task_errors": task_errors, "notes": {"batch_size": size, "engine_steps": timer.steps, "slot_occupancy": timer.occupancy}}


# ---------------------------------------------------------------- decode step cost by batch size


def run_step_cost(
    workload: Workload, out_dir: pathlib.Path, batch_sizes: Sequence[int] = (1, 4, 16, 64), steps: int = 48, **_: Any
) -> dict[str, Any]:
    """Median time of one decode step with N sequences running, on the workload's engine.

    What a synchronous batch's tail costs depends on it: while the batch's
    longest outputs finish, the engine steps with few sequences. If a step's
    cost is nearly flat in N (memory-bound decode, as on accelerators), each
    tail step costs a full step; if it grows with N (compute-bound, as on
    this CPU), a half-empty step costs about half.
    """
    from vllm import SamplingParams

    settings = workload.engine_settings()
    llm = load_llm(settings)
    timer = StepTimer(llm.llm_engine, settings.engine_args["max_num_seqs"])
    params = SamplingParams(max_tokens=steps, ignore_eos=True, temperature=0.0)
    rows = []
    for size in batch_sizes:
        prompts = [f"{index} invoice total amount due for the quarter" for index in range(size)]
        llm.generate(prompts, params, use_tqdm=False)  # warm-up at this batch shape
        timer.durations.clear()
        llm.generate(prompts, params, use_tqdm=False)
        decode = sorted(timer.durations[1:])  # the first step also prefills the prompts
        median_s = decode[len(decode) // 2]
        rows.append({"sequences": size, "ms_per_step": round(median_s * 1000, 1),
                     "tokens_per_s": round(size / median_s, 1)})
    return {"step_cost": rows, "peak_rss_bytes": own_peak_rss_bytes()}


# ---------------------------------------------------------------- child-process entry point


def _server(workload: Workload, out_dir: pathlib.Path, **kwargs: Any) -> dict[str, Any]:
    from benchmarks.server import run_server

    return run_server(workload, out_dir, **kwargs)


VARIANTS: dict[str, Callable[..., dict[str, Any]]] = {
    "raw": run_raw,
    "pipeline": run_pipeline,
    "text-first": run_text_first,
    "runinference": run_runinference,
    "server": _server,
    "step-cost": run_step_cost,
}


def main(argv: Sequence[str]) -> None:
    name, spec_path, out_path = argv
    spec = json.loads(pathlib.Path(spec_path).read_text())
    workload = Workload(**{**spec["workload"], "images": pathlib.Path(spec["workload"]["images"])})
    out_dir = pathlib.Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    result = VARIANTS[name](workload, out_dir, **spec.get("options", {}))
    result["records"] = [dataclasses.astuple(r) for r in result.get("records", ())]
    result.setdefault("peak_rss_bytes", own_peak_rss_bytes())
    pathlib.Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    import logging

    from benchmarks import variants  # the importable module, not __main__: Beam pickles __main__'s classes by value

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    variants.main(sys.argv[1:])
