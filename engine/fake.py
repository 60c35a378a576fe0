"""A scripted engine (`engine.api.Engine`) without vLLM: what a stage does with answers, tested in milliseconds.

    script = {"Describe the image.": Answer("a cat"), "List the boxes.": [Answer("no boxes"), Answer("[]")]}
    engines = EngineRegistry(lambda settings: FakeEngine(script))

A script maps an instruction to its answer, or to answers given in turn (the
n-th request with that instruction gets the n-th, the last one repeats); or
it is a callable from the request to its answer. An answer may come after a
delay, fail its own request (`error`: a request the engine rejected), or
kill the engine (`kill`: it and every outstanding request fail with
`EngineDeadError`, later submissions too, as after a failed vLLM step).
Back-pressure and group admission are `VisionEngine`'s: `submit` blocks
while `max_in_flight` requests are outstanding, and admits an image's
requests whole.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import threading
from typing import Callable, Mapping, Optional, Sequence, Union

from PIL import Image

from engine.api import EngineDeadError, EngineRequest, EngineResult, EngineStopped, Preprocessing


@dataclasses.dataclass(frozen=True)
class Answer:
    """What the engine does with one request."""

    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    logprob_sum: Optional[float] = None  # the answer's tokens' summed log-probabilities (confidence)
    tokens: Optional[tuple[tuple[str, float], ...]] = None  # each token's text and log-probability (field confidence)
    shared_prefix_tokens: int = 0
    delay_s: float = 0.0  # from submission until the request settles (0: settled within submit)
    error: Optional[Exception] = None  # the request fails alone with this
    kill: bool = False  # the engine dies: this and every outstanding request fail with EngineDeadError


Script = Union[Mapping[str, Union[Answer, Sequence[Answer]]], Callable[[EngineRequest], Answer]]


class FakeEngine:
    """An `engine.api.Engine` answering from a script (see the module docstring)."""

    def __init__(self, script: Script, max_in_flight: int = 1_000_000):
        self._script = script
        self._max_in_flight = max_in_flight
        self._asked: collections.Counter[str] = collections.Counter()  # requests so far per instruction
        self._numbers = itertools.count()
        self._state = threading.Condition()  # guards everything below
        self._outstanding: dict[int, concurrent.futures.Future] = {}
        self._failure: Optional[EngineDeadError] = None
        self._images: set[str] = set()
        # What a test checks: requests admitted, each admission's (image key, requests) in order, closed by its owner.
        self.requests = 0
        self.groups: list[tuple[str, tuple[EngineRequest, ...]]] = []
        self.closed = False

    def submit(self, image: Image.Image, image_key: str, requests: Sequence[EngineRequest]) -> list[concurrent.futures.Future]:
        with self._state:
            if self.closed:
                raise RuntimeError("the fake engine is closed")
            if self._failure is not None:
                raise self._failure
            limit = max(self._max_in_flight, len(requests))  # a group is admitted whole, as VisionEngine admits it
            self._state.wait_for(lambda: len(self._outstanding) + len(requests) <= limit or self._failure is not None)
            if self._failure is not None:
                raise self._failure
            self.groups.append((image_key, tuple(requests)))
            self._images.add(image_key)
            self.requests += len(requests)
            admitted = []
            for request in requests:
                number, future = next(self._numbers), concurrent.futures.Future()
                self._outstanding[number] = future
                admitted.append((number, request, self._answer(request), future))
        for number, request, answer, _ in admitted:
            if answer.delay_s:
                timer = threading.Timer(answer.delay_s, self._settle, args=(number, request, answer))
                timer.daemon = True
                timer.start()
            else:
                self._settle(number, request, answer)
        return [future for _, _, _, future in admitted]

    def _answer(self, request: EngineRequest) -> Answer:
        if callable(self._script):
            return self._script(request)
        scripted = self._script[request.instruction]
        if isinstance(scripted, Answer):
            return scripted
        turn = self._asked[request.instruction]
        self._asked[request.instruction] += 1
        return scripted[min(turn, len(scripted) - 1)]

    def _settle(self, number: int, request: EngineRequest, answer: Answer) -> None:
        with self._state:
            future = self._outstanding.pop(number, None)
            if future is None:  # failed with the engine meanwhile
                return
            if answer.kill:
                failure = self._failure = EngineDeadError(f"the fake engine was killed by the answer to {request.instruction!r}")
                dead, self._outstanding = [future, *self._outstanding.values()], {}
            self._state.notify_all()
        if answer.kill:
            for each in dead:
                each.set_exception(failure)
        elif answer.error is not None:
            future.set_exception(answer.error)
        else:
            future.set_result(EngineResult(
                text=answer.text, finish_reason=answer.finish_reason, prompt_tokens=answer.prompt_tokens,
                generated_tokens=answer.generated_tokens, cached_tokens=answer.cached_tokens, latency_s=answer.delay_s,
                logprob_sum=answer.logprob_sum, tokens=answer.tokens,
                shared_prefix_tokens=answer.shared_prefix_tokens,
            ))

    def prompt_for(self, instruction: str) -> str:
        return f"<prompt>{instruction}</prompt>"

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def preprocessing(self) -> Preprocessing:
        with self._state:
            return Preprocessing(self.requests, len(self._images))

    def stop(self, reason: str) -> None:
        with self._state:
            self._failure = self._failure or EngineStopped(reason)
            stopped, self._outstanding = list(self._outstanding.values()), {}
            self._state.notify_all()
        for future in stopped:
            future.set_exception(EngineStopped(reason))

    def close(self) -> None:
        """Wait for outstanding requests (as VisionEngine.close does), then refuse new ones."""
        with self._state:
            self._state.wait_for(lambda: not self._outstanding)
            self.closed = True
