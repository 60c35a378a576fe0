"""vLLM's Gemma 4 reasoner for structured output, built for thinking mode.

With a reasoning parser, vLLM's structured-output manager constrains a
request only after the parser says the reasoning ended
(vllm/v1/structured_output/__init__.py, `_get_constraint_bounds`). It builds
the parser per request from `EngineCoreRequest.reasoning_parser_kwargs`
(`_get_reasoner`), which vLLM's OpenAI server fills with the request's
`chat_template_kwargs`; `LLMEngine.add_request`, the path this project
drives, has no way to pass them, so the parser is built without
`enable_thinking`. vLLM's Gemma 4 parser then does not wait for a thought
(vllm/parser/gemma4.py, `gemma4_config(thinking=False)`: `wait_for_reasoning`
off), `is_reasoning_end` is true at the prompt's `<|turn>model\\n`, and
the grammar holds from the first generated token: the model is never let
think.

This module registers the same parser under GEMMA4_THINKING, built as for a
request with `enable_thinking=True`. vLLM imports it in the engine core
(`structured_outputs_config.reasoning_parser_plugin`, a module name:
vllm/utils/import_utils.py `import_plugin`), wherever that process runs.
"""
from __future__ import annotations

from typing import Any

from vllm.reasoning import ReasoningParserManager
from vllm.reasoning.gemma4_engine_reasoning_parser import Gemma4ParserReasoningAdapter

GEMMA4_THINKING = "gemma4_thinking"


@ReasoningParserManager.register_module(GEMMA4_THINKING)
class Gemma4ThinkingReasoner(Gemma4ParserReasoningAdapter):
    """vLLM's `gemma4` reasoning parser as for a request with `chat_template_kwargs={"enable_thinking": True}`."""

    def __init__(self, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        chat_template_kwargs = {**(kwargs.pop("chat_template_kwargs", None) or {}), "enable_thinking": True}
        super().__init__(tokenizer, *args, chat_template_kwargs=chat_template_kwargs, **kwargs)
