"""A multi-turn chat session that keeps its KV cache between turns.

Each turn prefills only what is new: the end of the previous answer's turn and the new user
turn, rendered by the checkpoint's chat template as the difference between the conversation
without and with the new message. Earlier turns live in the cache as they were generated.
When the context is full the oldest turns are dropped and the rest is prefilled again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx

from .draft_control import DraftControl
from .generate import GenerationChunk, GenerationStats, make_cache, stream_generate
from .media import load_audio, load_image
from .models.drafter import Drafter
from .models.gemma import Model
from .processor import Inputs, Processor
from .sample import SamplingParams
from .tools import ToolCall, parse_output, tool_names
from .video import open_video

ANSWER_MARK = "\u2063answer\u2063"  # stands for the last answer when rendering what follows it


@dataclass
class ChatSession:
    model: Model
    processor: Processor
    system: str | None = None
    think: bool = False
    max_tokens: int = 512
    max_soft_tokens: int = 280
    video_soft_tokens: int = 70  # per video frame
    video_frames: int | None = 32  # frames sampled per video
    sampling: SamplingParams = field(default_factory=SamplingParams)
    history: list[dict] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # context trimming etc., for the front end
    prefill_progress: Callable[[int, int], None] | None = None
    drafter: Drafter | None = None  # an MTP drafter: speculative decoding
    draft_block_size: int = 4
    tools: list[dict] | None = None  # OpenAI function schemas the model may call
    kv_bits: int | None = None  # quantized KV cache (8 or 4 bits)
    kv_group_size: int = 64
    response_format: Any = None  # every answer as JSON (see stream_generate); thoughts stay free
    # "auto" (None: the same where it can be, see make_constraint)/"required"/a name/"none"
    tool_choice: str | dict | None = None

    def __post_init__(self) -> None:
        self.pending: list[dict] = []
        self.last_tool_calls: list[ToolCall] = []  # of the last answer, when it called tools
        self.stats = GenerationStats()  # of the last turn; cached_prompt_tokens > 0: the cache was reused
        # one draft controller for the whole session: its measured costs carry over between turns
        self.draft_control = DraftControl(self.draft_block_size - 1) if self.drafter else None
        self._reset_cache()

    def _reset_cache(self) -> None:
        self.cache = make_cache(self.model, kv_bits=self.kv_bits, kv_group_size=self.kv_group_size)
        self.tokens: list[int] = []  # every token id in the cache, in order
        self._cached_messages = 0  # how many history messages the cache holds

    def reset(self) -> None:
        self.history.clear()
        self.pending.clear()
        self._reset_cache()

    @property
    def context(self) -> int:
        return self.model.config.text.max_position_embeddings

    def attach_image(self, src: object) -> None:
        if self.model.config.vision is None:
            raise ValueError("this model has no vision input: it cannot take images")
        load_image(src)  # fail now, with the file's name, rather than at the next message
        self.pending.append({"type": "image", "image": src})

    def attach_audio(self, src: object) -> None:
        if self.model.config.audio is None:
            raise ValueError("this model has no audio input: it cannot take audio")
        load_audio(src)
        self.pending.append({"type": "audio", "audio": src})

    def attach_video(self, src: object) -> None:
        if self.model.config.vision is None:
            raise ValueError("this model has no vision input: it cannot take videos")
        open_video(src).close()  # the container and its video stream, checked now
        self.pending.append({"type": "video", "video": src})

    def _messages(self, history: list[dict]) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + history

    def _render(self, messages: list[dict], generation_prompt: bool = True) -> str:
        return self.processor.apply_chat_template(
            self._messages(messages),
            add_generation_prompt=generation_prompt,
            enable_thinking=self.think,
            tools=self.tools,
        )

    def _new_text(self, new: list[dict]) -> tuple[str, bool]:
        """The text to feed after what the cache holds, and whether it continues the cache."""
        full = self._render([*self.history, *new])
        if not self.tokens or self._cached_messages != len(self.history):
            return full, False
        before = self._render(self.history, generation_prompt=False)
        last = self.history[-1] if self.history else {}
        answer = last.get("content", "").strip() if isinstance(last.get("content"), str) else ""
        if not full.startswith(before) or last.get("tool_calls") or (answer and answer not in before):
            return full, False
        # what the template writes after the last answer ("<turn|>\n"), minus the end-of-turn
        # token the model generated itself and the cache already holds; found with a marker in
        # place of the answer, so an empty (interrupted) answer's turn is closed too
        probe = self._render([*self.history[:-1], {"role": "assistant", "content": ANSWER_MARK}], False)
        tail = probe[probe.rindex(ANSWER_MARK) + len(ANSWER_MARK) :]
        end = self.processor.tokenizer.decode(self.tokens[-1:])
        if end and tail.startswith(end) and self.tokens[-1] in self.processor.eos_token_ids:
            tail = tail[len(end) :]
        return tail + full[len(before) :], True

    @staticmethod
    def _media(messages: list[dict]) -> tuple[list, list, list]:
        parts = [p for m in messages if isinstance(m.get("content"), list) for p in m["content"]]
        return tuple([p[kind] for p in parts if p["type"] == kind] for kind in ("image", "audio", "video"))

    def _inputs(self, new: list[dict]) -> tuple[Inputs, bool]:
        feed, reuse = self._new_text(new)
        images, audio, videos = self._media(new if reuse else [*self.history, *new])
        inputs = self.processor.prepare(
            feed,
            images,
            audio,
            videos=videos,
            add_bos=not reuse,
            max_soft_tokens=self.max_soft_tokens,
            video_soft_tokens=self.video_soft_tokens,
            video_frames=self.video_frames,
            token_budget=self.context - (len(self.tokens) if reuse else 0),
        )
        if not reuse and self._rewind_to_common_prefix(inputs.ids):
            return Inputs(inputs.ids[len(self.tokens) :]), True
        if not reuse:
            self._reset_cache()
        return inputs, reuse

    def _rewind_to_common_prefix(self, ids: list[int]) -> bool:
        """Keep the cached tokens the full prompt `ids` starts with, rolling the caches back over the
        rest where they can (a tool call re-rendered in the template's own spelling, say); False
        when too little is shared or the new part holds media (its tensors are not split off)."""
        p = next((i for i, (a, b) in enumerate(zip(self.tokens, ids, strict=False)) if a != b), None)
        p = min(len(self.tokens), len(ids)) if p is None else p
        drop = len(self.tokens) - p
        c = self.model.config
        media = {c.image_token_id, c.audio_token_id, c.video_token_id}
        if p == 0 or p == len(ids) or drop > min(c.max_trim for c in self.cache) or media & set(ids[p:]):
            return False
        for c in self.cache:
            c.trim(drop)
        del self.tokens[p:]
        return True

    def send(self, text: str, tool_results: Sequence[dict] = ()) -> Iterator[GenerationChunk]:
        """Stream the answer to `text` (with any attached images, audio and videos). `tool_results` answer
        calls of the last answer that got no result yet (stopped, say); they go before `text`."""
        user = {
            "role": "user",
            "content": [*self.pending, {"type": "text", "text": text}] if self.pending else text,
        }
        return self._turn([*self._tool_messages(tool_results), user])

    def send_tool_results(
        self, results: Sequence[dict], note: str | None = None
    ) -> Iterator[GenerationChunk]:
        """Give the model the results of the tool calls of its last answer (`{"name", "content"}`
        or `{"tool_call_id", "content"}` each, content a string or JSON value) and stream what it
        says next. Images attached meanwhile (a tool returned them; Gemma's tool responses hold
        text) follow the results in a user message with `note`."""
        new = self._tool_messages(results, required=True)
        if self.pending:
            new.append({"role": "user", "content": [*self.pending, {"type": "text", "text": note or ""}]})
        return self._turn(new)

    def _tool_messages(self, results: Sequence[dict], required: bool = False) -> list[dict]:
        if (results or required) and (not self.history or not self.history[-1].get("tool_calls")):
            raise ValueError("tool results need an answer with tool calls before them")
        return [{"role": "tool", **r} for r in results]

    def _turn(self, new: list[dict]) -> Iterator[GenerationChunk]:
        inputs, _ = self._inputs(new)  # may raise (bad media): attachments are kept then
        self.pending = []
        while len(self.tokens) + len(inputs.ids) + self.max_tokens > self.context and len(self.history) > 1:
            self.history = self.history[2:]  # drop the oldest exchange and prefill the rest again
            self.notices.append("context full: dropped the oldest turn")
            self._reset_cache()
            inputs, _ = self._inputs(new)
        self.history += new
        text = markup = ""
        self.stats = GenerationStats(prompt_tokens=len(inputs.ids), cached_prompt_tokens=len(self.tokens))
        self.tokens += inputs.ids
        try:
            for chunk in stream_generate(
                self.model,
                self.processor,
                inputs,
                cache=self.cache,
                max_tokens=self.max_tokens,
                prefill_progress=self.prefill_progress,
                drafter=self.drafter,
                draft_block_size=self.draft_block_size,
                draft_control=self.draft_control,
                tools=self.tools,
                tool_choice=self.tool_choice,
                response_format=self.response_format,
                enable_thinking=self.think,
                context_ids=self.tokens[: len(self.tokens) - len(inputs.ids)],
                **asdict(self.sampling),
            ):
                self.tokens.append(chunk.token)
                text += chunk.text
                markup += chunk.markup
                self.stats = chunk.stats
                yield chunk
        finally:
            self.history.append(self._answer(text, markup))
            self._cached_messages = len(self.history)
            self._sync_cache()

    def _answer(self, text: str, markup: str) -> dict:
        """The history entry of an answer: its text as generated, or, with tool calls, the text
        around them and the calls in OpenAI's form (the template spells them out again). Calls
        are read from the special tokens sampled (`markup`), never from text spelling them."""
        out = parse_output(markup, tool_names(self.tools)) if self.tools else None
        self.last_tool_calls = out.tool_calls if out else []
        tok = self.processor.tokenizer
        if not self.last_tool_calls:  # plain-written special-token text must not become markup
            return {"role": "assistant", "content": tok.escape_generated(markup) if markup else text}
        calls = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in out.tool_calls
        ]
        return {"role": "assistant", "content": tok.escape(out.content), "tool_calls": calls}

    def _sync_cache(self) -> None:
        """Make the cache hold exactly `self.tokens`: speculative decoding leaves the last token
        unfed or accepted drafts past a stop; an interrupt can leave layers at different offsets
        (then the next turn prefills everything)."""
        offsets = {c.offset for c in self.cache}
        extra = offsets.pop() - len(self.tokens) if len(offsets) == 1 else None
        if extra is None or (extra > 0 and extra > min(c.max_trim for c in self.cache)):
            self._cached_messages = -1
        elif extra > 0:
            for c in self.cache:
                c.trim(extra)
        elif extra < 0:
            self.model(mx.array([self.tokens[extra:]]), self.cache, logits_to_keep=1)
            mx.eval([c.state for c in self.cache])
