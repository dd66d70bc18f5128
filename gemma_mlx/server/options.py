"""What a request asks of generation beyond the prompt and the basic sampler: the response format
and tool-call constraint, penalties, logit_bias and logprobs (as `stream_generate` keyword
arguments), and the logprobs objects of the responses. The logic lives in the library
(`gemma_mlx.constrain`, `gemma_mlx.sample`); this module maps OpenAI's fields onto it."""

from __future__ import annotations

from typing import Any

from ..generate import GenerationResult
from ..processor import Inputs, Processor
from .schema import APIError, CompletionRequest


def constraints_available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def request_options(req: Any, inputs: Inputs, processor: Processor, vocab_size: int) -> dict:
    """A request's fields that shape generation beyond the sampler's basics, as `stream_generate`
    keyword arguments: the response format and tool-call constraint (compiled here once, so a
    schema the engine cannot enforce is a 400 naming its keyword before the request waits),
    penalties, logit_bias and logprobs."""
    out: dict = {
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logit_bias": {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
    }
    if req.repetition_penalty != 1:
        out["context_ids"] = list(inputs.ids[:-1])  # the worker feeds only the last prompt token
    if req.stream and req.logprobs not in (None, False):
        raise APIError(400, "logprobs: not available with stream: true (ask without streaming)", "logprobs")
    if isinstance(req, CompletionRequest):
        out["logprobs"] = req.logprobs
        return out
    out["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    response_format = req.response_format
    if response_format is not None and response_format.get("type") == "text":
        response_format = None
    choice = req.tool_choice
    if not req.tools or choice == "none":
        choice = "none"  # no call can open: <|tool_call> is never sampled
    elif choice is not None and not isinstance(choice, str):
        choice = choice.function.name
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools and choice != "none" else None
    if (response_format is not None or choice not in (None, "none")) and not constraints_available():
        from ..constrain import _llguidance

        try:
            _llguidance()
        except ImportError as e:
            raise APIError(400, str(e), "response_format" if response_format else "tool_choice") from None
    from ..constrain import make_constraint

    try:
        make_constraint(
            processor,
            vocab_size,
            response_format=response_format,
            tools=tools,
            tool_choice=choice,
            thinking=req.thinking,
        )
    except ValueError as e:
        param = "response_format" if str(e).startswith("response_format") else "tools"
        raise APIError(400, str(e), param, "invalid_value") from None
    out.update(response_format=response_format, tools=tools, tool_choice=choice, enable_thinking=req.thinking)
    return out


def _token_entry(processor: Processor, token: int, logprob: float) -> dict:
    text = processor.tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(result: GenerationResult, processor: Processor) -> dict:
    """OpenAI's chat `logprobs` object: each generated token with its alternatives."""
    content = []
    for lp in result.logprobs:
        entry = _token_entry(processor, lp.token, lp.logprob)
        entry["top_logprobs"] = [_token_entry(processor, t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(result: GenerationResult, processor: Processor) -> dict:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, offsets)."""
    tokens, offsets, pos = [], [], 0
    for lp in result.logprobs:
        text = processor.tokenizer.decode([lp.token])
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in result.logprobs],
        "top_logprobs": [{processor.tokenizer.decode([t]): v for t, v in lp.top} for lp in result.logprobs],
        "text_offset": offsets,
    }
