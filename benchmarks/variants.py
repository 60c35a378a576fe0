"""The designs under test, each run in its own process by `benchmarks.run`.

    python -m benchmarks.variants NAME SPEC.json OUT.json   (internal: benchmarks.run calls it)

One process per variant: every engine starts from the same state, OpenMP
threads are bound once, and the process's peak RSS is that variant's alone.
Each variant loads its engine (or starts its server) before the clock starts,
so the figures compare steady-state throughput, not start-up.

- raw: one `vllm.LLM.generate` over every prompt, images decoded beforehand.
- pipeline: `pipelines.vision_batch.run` (files -> Parquet) on the local runner.
- pipeline with `settings`: the same with EngineSettings changed (ablations, engine placements).
- host-stages: decode and preprocessing alone, as threads grow (the host feed).
- runinference: Beam RunInference, a ModelHandler calling `llm.generate(batch)`.
- server: `vllm serve` + OpenAI client with base64 image parts (benchmarks/server.py).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import pathlib
import sys
import threading
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import apache_beam as beam
import psutil
import pyarrow.parquet as pq
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from apache_beam.options.pipeline_options import PipelineOptions

from benchmarks.measure import CallTimer, StepTimer, TaskRecord, own_cpu_seconds, own_peak_rss_bytes, timed
from benchmarks.workload import Workload, decode_file, decode_files, image_files, instruction
from configuration.options import JobConfig
from engine.api import EngineSettings
from engine.local import RequestRenderer, engine_prompt, sampling_params
from engine.process import prepare_process
from engine.prompts import render_prompt
from engine.registry import ENGINES
from library import environment
from library.errors import ERRORS_TAG
from library.formats import DecodeLimits
from library.metadata import ItemValues
from library.shards import ShardSettings
from pipelines import vision_batch
from pipelines.runner import make_runner
from schemas.records import ImageItem, TaskCompletion
from schemas.tables import ERRORS_SCHEMA, RESULTS_SCHEMA
from tasks.task import Task
from transforms import decode, parse, sources
from transforms.run_tasks import image_key
from transforms.sinks import WriteTable, to_error_row


# ---------------------------------------------------------------- shared helpers


def load_llm(settings: EngineSettings) -> Any:
    """`vllm.LLM` in-process with exactly the pipeline's engine arguments."""
    prepare_process(settings)  # the process set-up VisionEngine makes
    from vllm import LLM

    return LLM(model=settings.model_path, **settings.engine_args)


def prompt_texts(llm: Any, tasks: Sequence[Task], image_first: bool = True) -> dict[str, str]:
    return prompt_texts_from(llm.get_tokenizer(), tasks, image_first)


def prompt_texts_from(tokenizer: Any, tasks: Sequence[Task], image_first: bool = True) -> dict[str, str]:
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
    model = _model_timer(llm.llm_engine)
    outputs, window = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
    records = [record(key, task, output) for (key, task), output in zip(keys, outputs)]
    return {"items": len(items), "wall_s": window.wall_s, "cpu_s": window.cpu_s, "busy_s": timer.seconds, "records": records,
            "notes": {"engine_steps": timer.steps, "slot_occupancy": timer.occupancy,
                      "engine_host_s": round(timer.seconds - model.seconds, 2) if model else None}}


# ---------------------------------------------------------------- (b) this pipeline, (e) ablations


def _run_with_engine(settings: EngineSettings, output: str, run: Callable[[], Any]) -> dict[str, Any]:
    """Run a pipeline whose RunTasks finds `settings`' engine already loaded; busy time from VisionEngine."""
    vision_engine = ENGINES.acquire(settings)  # loaded before the clock; the run reuses it (same settings key)
    busy_before = vision_engine.busy_seconds
    rendered_before = vision_engine.preprocessing()
    # Occupancy only; busy is the engine's own. With the engine core in its own process its steps
    # happen there: only the front end's view of them (outputs received) is counted here.
    timer = StepTimer(vision_engine._engine, settings.engine_args["max_num_seqs"])
    model = _model_timer(vision_engine._engine)
    front = _front_timer(vision_engine._engine)
    engines_before = ENGINES.live
    own_before = own_cpu_seconds()
    _, window = timed(run)
    own = own_cpu_seconds() - own_before
    if ENGINES.live != engines_before:
        raise RuntimeError("the run built its own engine inside the measured window: settings keys differ")
    records, task_errors = parquet_records(output)
    rendered = vision_engine.preprocessing()
    busy = vision_engine.busy_seconds - busy_before
    return {"items": len({r.image for r in records}), "wall_s": window.wall_s, "cpu_s": window.cpu_s,
            "busy_s": busy, "records": records, "task_errors": task_errors,
            "notes": {"engine_steps": timer.steps, "slot_occupancy": timer.occupancy,
                      # Engine busy time outside the model runner: scheduling, admission, output processing.
                      "engine_host_s": round(busy - model.seconds, 2) if model else None,
                      "engine_front_cpu_s": round(front.seconds, 2),
                      # CPU of the Beam process itself, and of its children (the engine-core process, if any).
                      "front_cpu_s": round(own, 2), "child_cpu_s": round(max(window.cpu_s - own, 0.0), 2),
                      "requests_rendered": rendered.requests - rendered_before.requests,
                      "images_preprocessed": rendered.images - rendered_before.images}}


def _model_timer(llm_engine: Any) -> Optional[CallTimer]:
    """Wall time in the model runner of an in-process engine (None when the core is in another process)."""
    core = getattr(llm_engine.engine_core, "engine_core", None)
    if core is None:
        return None
    return CallTimer([(core.model_executor, "execute_model"), (core.model_executor, "sample_tokens")])


def _front_timer(llm_engine: Any) -> CallTimer:
    """CPU time of the engine's front end in this process: inputs checked, requests handed on, outputs made text."""
    return CallTimer([(llm_engine.input_processor, "process_inputs"), (llm_engine.engine_core, "add_request"),
                      (llm_engine.output_processor, "process_outputs")], time.thread_time)


def _with_settings(workload: Workload, changes: Mapping[str, Any]) -> EngineSettings:
    """The engine settings the pipeline resolves for `workload`, with `changes` applied in this process.

    For variants that change what no user option sets (where images are
    preprocessed, where the engine core runs, the prompt layout): the job's
    own resolver, `JobConfig.resolve`, is wrapped so `vision_batch.run` builds the
    same graph with the changed settings, and the engine is loaded under them.
    """
    settings = dataclasses.replace(workload.engine_settings(), **changes)
    if changes:
        original = JobConfig.resolve

        def resolve(*args: Any, **kwargs: Any) -> JobConfig:
            config = original(*args, **kwargs)
            return dataclasses.replace(config, engine=dataclasses.replace(config.engine, **changes))

        JobConfig.resolve = staticmethod(resolve)  # type: ignore[method-assign]
    return settings


def run_pipeline(workload: Workload, out_dir: pathlib.Path, settings: Optional[Mapping[str, Any]] = None,
                 **_: Any) -> dict[str, Any]:
    """`vision_batch.run` on the workload's files; `settings`: EngineSettings fields to change (ablations)."""
    output = str(out_dir / "out")
    engine_settings = _with_settings(workload, settings or {})
    return _run_with_engine(engine_settings, output, lambda: vision_batch.run(workload.pipeline_argv(output)))


# ---------------------------------------------------------------- (hf1), (hf2) several processes feeding one engine core


class _DescendantCpu:
    """CPU seconds of every descendant process of this one, sampled while they live (they exit before the end)."""

    def __init__(self, interval_s: float = 0.5):
        self._last: dict[tuple[int, float], float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval_s,), daemon=True)
        self._thread.start()

    def _run(self, interval_s: float) -> None:
        while True:
            for process in psutil.Process().children(recursive=True):
                try:
                    times = process.cpu_times()
                    self._last[(process.pid, process.create_time())] = times.user + times.system
                except psutil.Error:
                    continue
            if self._stop.wait(interval_s):
                return

    def stop(self) -> dict[int, float]:
        """CPU seconds by pid, as last seen."""
        self._stop.set()
        self._thread.join()
        return {pid: seconds for (pid, _), seconds in self._last.items()}


def run_feeders(workload: Workload, out_dir: pathlib.Path, feeders: int, **_: Any) -> dict[str, Any]:
    """The pipeline on Beam's local runner with `feeders` worker processes, all feeding one shared engine core.

    Both rows use the shared-core machinery (engine/host.py) with the same total requests in
    flight, so they differ only in how many processes decode, render and detokenize. The engine core is
    started before the clock (this process attaches first and stays attached, idle); Beam's worker
    processes start inside the window, so the steady-state rate (between the first and the last answer
    written, from the rows' created_at) is reported beside the whole window's.
    """
    import os

    os.environ[environment.HOST_ENGINE_DIR.name] = str(out_dir / "he")
    total_in_flight = workload.max_in_flight or workload.engine_settings().max_in_flight
    shared = dataclasses.replace(
        workload,
        max_in_flight=-(-total_in_flight // feeders),
        beam_options=(*workload.beam_options, "--host_feeders=2", "--direct_running_mode=multi_processing",
                      f"--direct_num_workers={feeders}"),
    )
    output = str(out_dir / "out")
    settings = _with_settings(shared, {"preprocess_on_step_thread": False})
    client = ENGINES.acquire(settings)._engine  # starts the host's engine core before the clock
    core_processes = {client.slot.state.core.pid, client.slot.state.supervisor.pid}
    sampler = _DescendantCpu()
    cpu_before = dict(sampler._last)
    _, window = timed(lambda: vision_batch.run(shared.pipeline_argv(output)))
    cpu = sampler.stop()
    before = {pid: seconds for (pid, _), seconds in cpu_before.items()}
    core_cpu = sum(cpu.get(pid, 0.0) - before.get(pid, 0.0) for pid in core_processes)
    feeding_cpu = sum(seconds - before.get(pid, 0.0) for pid, seconds in cpu.items() if pid not in core_processes)
    records, task_errors = parquet_records(output)
    created = sorted(row["created_at"] for row in pq.read_table(f"{output}/results", columns=["created_at"]).to_pylist())
    steady_s = (created[-1] - created[0]).total_seconds()
    items = len({r.image for r in records})
    return {"items": items, "wall_s": window.wall_s, "cpu_s": window.cpu_s, "records": records,
            "task_errors": task_errors,
            "notes": {"feeding_processes": feeders, "front_cpu_s": round(feeding_cpu, 2), "child_cpu_s": round(core_cpu, 2),
                      # Answers per second between the first and the last written (worker start-up excluded).
                      "steady_tasks_per_s": round((len(created) - 1) / steady_s, 2) if steady_s else None,
                      "steady_items_per_s": round((len(created) - 1) / steady_s / len(workload.specs()), 2) if steady_s else None}}


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


# ---------------------------------------------------------------- host-side stages alone


def _rate(work: Callable[[Any], Any], inputs: Sequence[Any], threads: int) -> dict[str, Any]:
    """`work` over `inputs` on `threads` threads of this process: items/s and CPU seconds per item."""
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        _, window = timed(lambda: list(pool.map(work, inputs)))
    return {"threads": threads, "items_per_s": round(len(inputs) / window.wall_s, 2),
            "cpu_ms_per_item": round(window.cpu_s / len(inputs) * 1000, 1), "cores_busy": round(window.cpu_s / window.wall_s, 2)}


def run_host_stages(
    workload: Workload, out_dir: pathlib.Path, page_images: Optional[str] = None, threads: Sequence[int] = (1, 2, 4, 8),
    other_models: Optional[Mapping[str, str]] = None, **_: Any,
) -> dict[str, Any]:
    """Items/s of the host-side stages alone in one process, as its threads grow.

    What the Beam process of an accelerator worker does per item besides
    the engine: the pipeline's decode stage (read, hash, decode, orient,
    downscale) and rendering the item's requests (`RequestRenderer`: each
    task's prompt tokenized, the image preprocessed once for all tasks, one
    render at a time as in the pipeline), on the workload's images and on
    page-sized ones. "per task" renders without the processed-image cache:
    the image preprocessed for every task, as before it was shared.
    `other_models` (name -> checkpoint): their image processors too, on the
    workload's images (decode does not depend on the model).
    """
    rows = _host_stage_rows(workload, page_images, threads, with_decode=True)
    for name, path in (other_models or {}).items():
        other = dataclasses.replace(workload, model_path=path, model_id=name)
        rows += _host_stage_rows(other, None, threads, with_decode=False)
    return {"host_stages": rows, "peak_rss_bytes": own_peak_rss_bytes()}


def _host_stage_rows(workload: Workload, page_images: Optional[str], threads: Sequence[int], with_decode: bool) -> list[dict[str, Any]]:
    from vllm import EngineArgs
    from vllm.renderers import renderer_from_config

    settings = workload.engine_settings()
    prepare_process(settings)
    configs = {
        "shared": EngineArgs(model=settings.model_path, **settings.engine_args).create_engine_config(),
        "per task": EngineArgs(model=settings.model_path, **{**settings.engine_args, "mm_processor_cache_gb": 0})
        .create_engine_config(),
    }
    tokenizer = renderer_from_config(configs["shared"]).get_tokenizer()
    texts = prompt_texts_from(tokenizer, workload.specs())
    decoder = decode.DecodeUnits(DecodeLimits(), ShardSettings())

    budgets = {task.name: task.request(ItemValues(None)).vision_tokens for task in workload.specs()}

    def render(renderer: RequestRenderer, item: ImageItem) -> None:
        for name, text in texts.items():
            renderer.render(engine_prompt(text, item.image, image_key(item), budgets[name]))

    def cold(mode: str) -> RequestRenderer:  # a fresh renderer: nothing cached from the previous row
        return RequestRenderer(renderer_from_config(configs[mode]), configs[mode].model_config)

    rows = []
    sets = {"workload": workload.images, **({"pages": pathlib.Path(page_images)} if page_images else {})}
    for set_name, directory in sets.items():
        files = image_files(directory)
        items = [decode_file(decoder, path) for path in files]
        for count in threads:
            stages: dict[str, tuple[Callable[[Any], Any], Sequence[Any]]] = {
                "preprocess (shared)": (functools.partial(render, cold("shared")), items),
                "preprocess (per task)": (functools.partial(render, cold("per task")), items),
            }
            if with_decode:
                stages = {
                    "decode": (lambda path: decode_file(decoder, path), files),
                    **stages,
                    "decode + preprocess (shared)": (
                        lambda path, renderer=cold("shared"): render(renderer, decode_file(decoder, path)), files),
                }
            for stage, (work, inputs) in stages.items():
                rows.append({"images": set_name, "model": workload.model_id, "stage": stage, **_rate(work, inputs, count)})
    return rows


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
    "feeders": run_feeders,
    "host-stages": run_host_stages,
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
