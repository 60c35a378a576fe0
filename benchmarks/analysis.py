"""The hand-written parts of BENCHMARKS.md: how each figure is measured, and what the last run means.

`DEFINITIONS` holds for every run. `ANALYSIS` reads one run's figures: update it
when a new run changes the picture (the tables above it are regenerated).
"""

ANALYSIS = """## Analysis

(to be written from the final run)
"""

DEFINITIONS = """## How each figure is measured

Every variant runs in its own process (`benchmarks/variants.py`), one after the other, on the
same image files, the same prompts (`transforms/prompts.py` through the checkpoint's chat
template), the same sampling settings and the same engine arguments (resolved from the
pipeline's own command line by `pipelines.options.JobConfig`). Engine load and server start-up
happen before the clock starts.

- **Wall time (the window every rate divides by).**
  (a) the `LLM.generate` call only: images decoded and prompts built before it.
  (b), (e1), (e2) the `vision_batch.run` call (e2: the same graph built from the same command
  line with `EngineSettings.image_first=False`): Beam graph, matching, planning, reshuffle,
  decode, engine, parse, Parquet write and finalisation, run summary. The engine is loaded
  beforehand into the process's engine registry under the same settings key, so the run
  reuses it, as a long-lived Dataflow worker does.
  (c) `pipeline.run().wait_until_finish()` of the same graph with RunInference in place of
  `RunTasks`: same sources, decode, parse and Parquet sink.
  (d) from the client's first file read to its Parquet file written; the server was started
  and healthy before.
- **tasks/s** counts answered requests (result rows plus per-task error rows); **items/s**
  images. **prompt / gen tok/s**: prompt tokens (image soft tokens included, as the engine
  counts them) and generated tokens per second of wall time.
- **prefix reuse** = over all images, the cached prompt tokens of every task except the
  first one computed for its image, divided by (tasks − 1) × the image's shared-prefix
  length. The shared prefix is what all tasks of an image have in common (system prompt +
  image): its length is a request's prompt tokens minus its task's suffix, which
  `benchmarks.workload.prompt_suffix_tokens` computes from the checkpoint's processor as
  `tests/test_pipeline_e2e.py::prefix_lengths` does (the image's own token count varies with
  its aspect ratio; the suffix does not). The first task of an image can only hit other
  images' system-prompt blocks, so it is left out of the numerator. `results.json` also has
  `prefix_reuse_of_block_aligned` (the same against the prefix rounded down to the cache's
  block granularity) and `computed_prompt_tokens` (prompt tokens actually prefilled).
- **engine busy** = share of the wall-time window during which the engine had work and ran
  it. (b), (e): `VisionEngine.busy_seconds` (time inside `LLMEngine.step()`, from
  `transforms.engine.ENGINES`). (a), (c): the same measured by wrapping the `LLMEngine.step`
  of the `vllm.LLM`. (d): the server's `vllm:num_requests_running` gauge polled from
  `/metrics` every 0.25 s; intervals where it was > 0. `slot_occupancy` in `results.json`:
  time-weighted share of the engine's `max_num_seqs` slots holding a request during steps
  (how full the running batch was, which busy time alone does not show).
- **peak RSS**: `ru_maxrss` of the variant's process (model load included); (d): the sampled
  peak of the server's process tree (API server + engine core) plus the client's `ru_maxrss`.
- **CPU s/task** (`cpu_s_per_task` in `results.json`): user + system CPU time of the
  variant's processes over the window per task; less sensitive than wall time to the other
  work on a shared box.
- **Streaming check**: variant (b) on the `tiny-dense` model at two input sizes, each in a
  fresh process; peak RSS = `ru_maxrss` of that process.
"""
