"""The tasks of an image share its prefix (system prompt + image) at every image budget (docs/architecture.md, "Prefix sharing")."""
from __future__ import annotations

import concurrent.futures

import numpy as np
import pytest

from engine.api import EngineRequest
from engine.local import PrefixGroups, _Request, common_prefix_length, prefix_groups
from engine.prompts import Sampling
from transforms.summary import TallyFn, prefix_sharing, prefix_sharing_warning, tally_result


def _request(name: str, image_tokens: int = 1120) -> _Request:
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return _Request(name, prompt={}, params=SamplingParams(output_kind=RequestOutputKind.FINAL_ONLY),
                    future=concurrent.futures.Future(), image_tokens=image_tokens)


def test_an_images_requests_form_one_prefix_group_per_budget_in_submission_order():
    spec = lambda budget: EngineRequest("x", 4, Sampling(), vision_tokens=budget)  # noqa: E731
    assert prefix_groups([spec(None), spec(560), spec(None), spec(560), spec(280)]) == [[0, 2], [1, 3], [4]]


def test_a_groups_leader_goes_alone_and_streams_and_its_siblings_wait_for_its_first_output():
    from vllm.sampling_params import RequestOutputKind

    groups = PrefixGroups(2048)
    ocr, caption, detect = (_request(name) for name in ("ocr", "caption", "detect"))
    assert groups.lead([ocr, caption, detect]) is ocr
    assert ocr.params.output_kind == RequestOutputKind.CUMULATIVE  # its first output says its prefill is computed
    assert groups.released("another image's request") == []
    assert groups.released("ocr") == [caption, detect]
    assert groups.released("ocr") == []  # released once
    assert caption.params.output_kind == detect.params.output_kind == RequestOutputKind.FINAL_ONLY


def test_a_rejected_leader_hands_the_lead_on_and_a_lone_request_is_not_held():
    from vllm.sampling_params import RequestOutputKind

    groups = PrefixGroups(2048)
    ocr, caption, detect = (_request(name) for name in ("ocr", "caption", "detect"))
    groups.lead([ocr, caption, detect])
    rest = groups.rejected(ocr)
    assert rest == [caption, detect] and groups.lead(rest) is caption and groups.released("caption") == [detect]
    alone = _request("alone")
    assert groups.lead([alone]) is alone and alone.params.output_kind == RequestOutputKind.FINAL_ONLY
    groups.lead([ocr, caption])
    groups.queue([[detect]])
    assert groups.drain() == [caption, detect] and groups.released("ocr") == [] and groups.next_group({}) is None


def test_leaders_in_prefill_hold_at_most_one_step_of_the_encoder_budget():
    """vLLM encodes max(max_num_batched_tokens, image) image tokens per step: 2048 -> one 1,120-token image, seven of 280."""
    groups = PrefixGroups(2048)
    images = [[_request(f"{image}-{task}") for task in ("ocr", "caption")] for image in "abc"]
    groups.queue(images)
    running: dict = {}
    first = groups.next_group(running)
    assert first is images[0] and groups.lead(first).request_id == "a-ocr"
    running["a-ocr"] = first[0]
    assert groups.next_group(running) is None  # b's image would start on its text alone
    assert groups.released("a-ocr") == [images[0][1]]  # a's prefill computed: its sibling goes, then b leads
    assert groups.next_group(running) is images[1]
    groups.lead(images[1])
    assert groups.next_group({}) is images[2]  # a leader gone without an output (aborted) holds nothing
    small = PrefixGroups(2048)
    small.queue([[_request(f"{image}-{task}", 280) for task in ("ocr", "caption")] for image in "abcdefgh"])
    led = []
    while (group := small.next_group({request_id: None for request_id in led})) is not None:
        led.append(small.lead(group).request_id)
    assert len(led) == 7  # 7 x 280 <= 2048
    lone = PrefixGroups(None)  # no budget known: no limit
    lone.queue(images)
    assert [lone.lead(g).request_id for g in iter(lambda: lone.next_group({"a-ocr": 0, "b-ocr": 0}), None)] == ["a-ocr", "b-ocr", "c-ocr"]


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix_length([1, 2], ()) == 0


def _row(cached: int, shared: int) -> dict:
    return {"task": "t", "latency_ms": 1.0, "prompt_tokens": 1300, "generated_tokens": 4, "cached_tokens": cached,
            "shared_prefix_tokens": shared, "truncated": False, "detections": None, "attempts": 1, "quality_flags": []}


def test_the_summarys_prefix_sharing_covers_every_group_and_counts_the_misses():
    fn = TallyFn()
    # Two groups: one shared (first task 0 cached, second 1,152 of 1,160), one where the second task computed the image.
    rows = [_row(0, 0), _row(1152, 1160), _row(64, 0), _row(64, 1160)]
    tally = fn.extract_output(fn.merge_accumulators([fn.add_input(fn.create_accumulator(), tally_result(r)) for r in rows]))
    assert prefix_sharing(tally) == {"tasks": 2, "shared_tokens": 2320, "reused_tokens": 1216, "reuse": round(1216 / 2320, 4),
                                     "misses": 1}
    assert prefix_sharing({})["reuse"] is None  # no group of two tasks: nothing to share
    assert "1 of the 2 tasks" in prefix_sharing_warning(prefix_sharing(tally))
    # Every task shared, its hit short by a partial cache block (reuse ~0.8 on short prefixes): no warning.
    whole = [_row(0, 0), _row(256, 316), _row(256, 316)]
    clean = fn.extract_output(fn.merge_accumulators([fn.add_input(fn.create_accumulator(), tally_result(r)) for r in whole]))
    assert prefix_sharing(clean)["reuse"] < 0.9 and prefix_sharing_warning(prefix_sharing(clean)) is None


@pytest.mark.engine
def test_every_task_after_the_first_takes_the_image_prefix_from_the_cache_at_1120_tokens(tiny_checkpoint):
    """Two images at once, three tasks each, at the largest budget: each image's prefix is computed once.

    Before: the encoder budget let one 1,120-token image into a step, and the other image's tasks started
    on their text alone and computed the image each (cached 64 = the system prompt); and the sliding-window
    layers kept blocks only where a prompt ended, so the image's second task missed even alone.
    """
    from PIL import Image

    from engine.registry import ENGINES
    from tests.test_engine_isolation import _requests, _tiny_settings
    from tests.test_pipeline_e2e import prefix_lengths

    budget, block = 1120, 64  # tiny-e2b shares KV in 64-token units (test_pipeline_e2e)
    specs = [EngineRequest(s.instruction, s.max_tokens, s.sampling, s.constraint, vision_tokens=budget)
             for s in _requests(("ocr", "caption", "detect"))]
    engine = ENGINES.acquire(_tiny_settings(tiny_checkpoint))
    rng = np.random.default_rng(24)
    images = {f"sharing-{index}": Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for index in range(2)}
    submitted = [engine.submit(image, key, specs) for key, image in images.items()]
    before_image, through_image = prefix_lengths(tiny_checkpoint, [s.instruction for s in specs], budget)
    assert through_image > budget
    for futures in submitted:
        first, *others = [future.result(timeout=600) for future in futures]
        assert first.cached_tokens <= before_image and first.shared_prefix_tokens == 0
        for result in others:
            assert through_image - block < result.cached_tokens <= through_image, (first, others)
            assert result.shared_prefix_tokens >= through_image
