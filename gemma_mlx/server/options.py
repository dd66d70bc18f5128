"""What a request asks of generation beyond the prompt and the basic sampler: the response format
and tool-call constraint, penalties, logit_bias and logprobs (as `stream_generate` keyword
arguments), and the logprobs objects of the responses. The logic lives in the library
(`gemma_mlx.constrain`, `gemma_mlx.sample`); this module maps OpenAI's fields onto it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..generate import TokenLogprob
from ..processor import Processor
from .schema import APIError, CompletionRequest


def constraints_available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


def sampler_options(req: Any) -> dict:
    """Chat and text completions' fields that shape the sampler beyond its basics, as
    `stream_generate` keyword arguments: penalties, logit_bias and logprobs."""
    out: dict = {
        "frequency_penalty": req.frequency_penalty,
        "presence_penalty": req.presence_penalty,
        "repetition_penalty": req.repetition_penalty,
        "logit_bias": {int(k): v for k, v in req.logit_bias.items()} if req.logit_bias else None,
    }
    if req.stream and req.logprobs not in (None, False):
        raise APIError(400, "logprobs: not available with stream: true (ask without streaming)", "logprobs")
    if isinstance(req, CompletionRequest):
        out["logprobs"] = req.logprobs
        return out
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
    out["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    return out


def constraint_options(conv: Any, processor: Processor, vocab_size: int) -> dict:
    """The response format and tool-call constraint of a conversation (any API), as
    `stream_generate` keyword arguments, compiled here once so that a schema the engine cannot
    enforce is a 400 naming the request's field and keyword before the request waits."""
    response_format = conv.response_format
    if response_format is not None and response_format.get("type") == "text":
        response_format = None
    choice = conv.tool_choice
    if not conv.tools or choice == "none":
        choice = "none"  # no call can open: <|tool_call> is never sampled
    elif isinstance(choice, dict):
        choice = choice["name"]
    tools = conv.tools if conv.tools and choice != "none" else None
    if (response_format is not None or choice not in (None, "none")) and not constraints_available():
        from ..constrain import _llguidance

        try:
            _llguidance()
        except ImportError as e:
            param = conv.format_param if response_format is not None else conv.tool_choice_param
            raise APIError(400, f"{param}: {e}", param) from None
    from ..constrain import make_constraint

    try:
        make_constraint(
            processor,
            vocab_size,
            response_format=response_format,
            tools=tools,
            tool_choice=choice,
            thinking=conv.thinking,
        )
    except ValueError as e:
        message = str(e)
        if message.startswith("response_format"):  # named as the request's own field
            param, message = conv.format_param, conv.format_param + message[len("response_format") :]
        else:
            param = conv.tools_param
        raise APIError(400, message, param, "invalid_value") from None
    return {
        "response_format": response_format,
        "tools": tools,
        "tool_choice": choice,
        "enable_thinking": conv.thinking,
    }


def _token_entry(processor: Processor, token: int, logprob: float) -> dict:
    text = processor.tokenizer.decode([token])
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def chat_logprobs(logprobs: Sequence[TokenLogprob], processor: Processor) -> dict:
    """OpenAI's chat `logprobs` object: each generated token with its alternatives."""
    content = []
    for lp in logprobs:
        entry = _token_entry(processor, lp.token, lp.logprob)
        entry["top_logprobs"] = [_token_entry(processor, t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


def completion_logprobs(logprobs: Sequence[TokenLogprob], processor: Processor) -> dict:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, offsets)."""
    tokens, offsets, pos = [], [], 0
    for lp in logprobs:
        text = processor.tokenizer.decode([lp.token])
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{processor.tokenizer.decode([t]): v for t, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }
