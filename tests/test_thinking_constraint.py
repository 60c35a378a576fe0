"""Thinking with constrained output: the grammar starts after the thought, never at the first token.

vLLM's structured-output manager builds the reasoning parser the engine
arguments name, per request, with the request's `reasoning_parser_kwargs`
(none on the `LLMEngine` path), and constrains nothing while
`is_reasoning_end` is false (vllm/v1/structured_output/__init__.py,
`_get_reasoner`, `_get_constraint_bounds`).
"""
from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from configuration.options import JobConfig
from engine.checkpoint_shape import CheckpointShape
from engine.prompts import THOUGHT_END, build_messages
from tasks.builtin import BUILTIN_TASKS


def _structured_outputs_config(*args: str) -> dict:
    options = PipelineOptions(["--output", "out", "--input", "a", "--tasks", "detect", *args])
    return dict(JobConfig.from_options(options, "/m", "model", False).engine.engine_args["structured_outputs_config"])


def _reasoner_as_vllm_builds_it(config: dict, tokenizer):
    """What StructuredOutputManager does: import the plugin, look the parser up, build it with no request kwargs."""
    from vllm.reasoning import ReasoningParserManager

    if config.get("reasoning_parser_plugin"):
        ReasoningParserManager.import_reasoning_parser(config["reasoning_parser_plugin"])
    return ReasoningParserManager.get_reasoning_parser(config["reasoning_parser"])(tokenizer=tokenizer)


def _thinking_prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(
        build_messages(BUILTIN_TASKS["detect"].instruction), tokenize=False, add_generation_prompt=True,
        enable_thinking=True,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_with_thinking_on_the_grammar_waits_for_the_end_of_the_thought(tiny_checkpoint):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    reasoner = _reasoner_as_vllm_builds_it(_structured_outputs_config("--thinking", "on"), tokenizer)
    prompt = _thinking_prompt_ids(tokenizer)
    # At the prompt's end the thought has not ended: the first generated tokens are not constrained ...
    assert not reasoner.is_reasoning_end(prompt)
    thought = tokenizer("<|channel>thought\nthe boxes are", add_special_tokens=False)["input_ids"]
    end = reasoner.find_reasoning_end(thought)
    assert end.offset == len(thought)  # no end in the thought: nothing in it constrained
    # ... and the grammar holds from the token after <channel|>.
    answer = [*thought, tokenizer.convert_tokens_to_ids(THOUGHT_END), *tokenizer("[", add_special_tokens=False)["input_ids"]]
    assert reasoner.find_reasoning_end(answer).offset == len(thought)
    assert reasoner.is_reasoning_end([*prompt, *answer])


def test_without_thinking_no_reasoner_delays_the_grammar():
    assert "reasoning_parser" not in _structured_outputs_config()
    # A profile without structured output has no grammar to delay: the validation ladder decides.
    assert "structured_outputs_config" not in JobConfig.from_options(
        PipelineOptions(["--output", "out", "--input", "a", "--thinking", "on", "--engine_profile", "tpu-v6e-1-gemma4-12b"]),
        "/m", "model", False,
    ).engine.engine_args


@pytest.mark.engine
def test_with_thinking_on_the_first_generated_tokens_are_not_forced_into_the_schema(tiny_checkpoint):
    """On the real engine: a grammar that allows only the tokens spelling "yes", and a logit bias that bans them.

    Forced into the grammar, the first token must be one of them (every other token is masked
    out); free, it never is (banned). The thought's end marker is banned too, so the thought
    never ends within the request. Nothing here depends on what the random weights prefer.
    """
    from vllm import LLM
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    from engine.api import EngineSettings
    from engine.process import prepare_process

    options = PipelineOptions(["--output", "out", "--input", "a", "--tasks", "detect", "--thinking", "on"])
    args = dict(JobConfig.from_options(options, str(tiny_checkpoint), "model", False,
                                       CheckpointShape.read(str(tiny_checkpoint))).engine.engine_args)
    args.pop("mm_processor_kwargs", None)
    prepare_process(EngineSettings(model_path=str(tiny_checkpoint), engine_args=args, max_in_flight=1, structured_output=True))
    llm = LLM(model=str(tiny_checkpoint), **args)
    tokenizer = llm.get_tokenizer()
    spelling_yes = [
        token_id for token, token_id in tokenizer.get_vocab().items()
        if (text := tokenizer.convert_tokens_to_string([token])) and "yes".startswith(text)
    ]
    assert spelling_yes
    banned = {token_id: -100.0 for token_id in [*spelling_yes, tokenizer.convert_tokens_to_ids(THOUGHT_END)]}
    params = SamplingParams(
        max_tokens=4, temperature=0.0, logit_bias=banned, skip_special_tokens=False,
        structured_outputs=StructuredOutputsParams(choice=["yes"]),
    )
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Answer yes."}], tokenize=False, add_generation_prompt=True, enable_thinking=True,
    )
    generated = llm.generate([text], params)[0].outputs[0].token_ids
    assert generated and generated[0] not in spelling_yes
