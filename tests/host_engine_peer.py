"""A worker process for tests/test_host_engine.py: attaches to the host's engine core and answers commands.

Run as `python -m tests.host_engine_peer CHECKPOINT`; reads one JSON command per
line on stdin, writes one JSON answer per line on stdout:

- {"cmd": "import"} -> {} (imports vLLM's front end, so that a later attach is quick)
- {"cmd": "attach"} -> {"pid", "core_pid", "slot", "reclaimed"}, or {"error"} when the engine cannot start
- {"cmd": "strays"} -> {"outputs", "aborted"}: outputs of requests this process never sent (a dead client's, on a
  reclaimed slot) that reached it, and how many of those requests it aborted in the core
- {"cmd": "submit", "seed": S, "key": K, "tasks": [...], "max_tokens": N, "unending": B} -> {"submitted": n}
  (an image of noise from seed S, its tasks queued without waiting; `unending`: each answer is
  constrained to a 100,000-character string, so it runs to max_tokens whatever the random weights)
- {"cmd": "collect", "timeout": T} -> {"results": [{"ok", "error", "prompt_tokens", "cached_tokens"}, ...]}
  (every request submitted since the last collect, settled within T seconds or reported as "timeout")
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import sys


def settings(checkpoint: str):
    from engine.api import EngineSettings
    from engine.checkpoint_shape import CheckpointShape
    from engine.profiles import resolve, shared_by_feeders

    profile = shared_by_feeders(resolve("cpu-tiny", None, CheckpointShape.read(checkpoint)), 2)
    return EngineSettings(
        model_path=checkpoint, engine_args=profile.engine_args, max_in_flight=profile.max_in_flight,
        structured_output=True, preprocess_on_step_thread=False, host_feeders=profile.host_feeders,
    )


def main(checkpoint: str) -> None:
    # Answers keep the real stdout; everything else written there (vLLM logs to stdout) goes to stderr.
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    from PIL import Image

    from engine.api import Constraint
    from engine.registry import ENGINES
    from library.metadata import ItemValues
    from tasks.builtin import BUILTIN_TASKS
    from tasks.task import with_overrides

    engine_settings = settings(checkpoint)
    pending: list[concurrent.futures.Future] = []
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "import":
            import vllm.v1.engine.async_llm  # noqa: F401

            answer = {}
        elif command["cmd"] == "attach":
            try:
                client = ENGINES.acquire(engine_settings)._engine
                answer = {"pid": os.getpid(), "core_pid": client.core_pid, "slot": client.slot.index,
                          "reclaimed": client.slot.reclaimed}
            except RuntimeError as exc:  # the engine failed to start: say why
                answer = {"error": f"{type(exc.__cause__).__name__}: {exc.__cause__}"}
        elif command["cmd"] == "submit":
            image = Image.effect_noise((320, 240), 64 + command["seed"]).convert("RGB")
            requests = [with_overrides(BUILTIN_TASKS[name], max_tokens=command["max_tokens"]).request(ItemValues(None))
                        for name in command["tasks"]]
            if command.get("unending"):
                requests = [dataclasses.replace(r, constraint=Constraint(json_schema={"type": "string", "minLength": 100_000})) for r in requests]
            futures = ENGINES.acquire(engine_settings).submit(image, command["key"], requests)
            pending.extend(futures)
            answer = {"submitted": len(futures)}
        elif command["cmd"] == "strays":
            strays = ENGINES.acquire(engine_settings)._engine.strays
            answer = {"outputs": strays.outputs, "aborted": len(strays.aborted)}
        elif command["cmd"] == "collect":
            done, _ = concurrent.futures.wait(pending, timeout=command["timeout"])
            answer = {"results": [_describe(future, future in done) for future in pending]}
            pending = []
        else:
            raise ValueError(f"unknown command {command}")
        print(json.dumps(answer), file=answers, flush=True)


def _describe(future: concurrent.futures.Future, done: bool) -> dict:
    if not done:
        return {"ok": False, "error": "timeout"}
    if future.exception() is not None:
        return {"ok": False, "error": type(future.exception()).__name__}
    result = future.result()
    return {"ok": True, "error": None, "prompt_tokens": result.prompt_tokens, "cached_tokens": result.cached_tokens}


if __name__ == "__main__":
    main(sys.argv[1])
