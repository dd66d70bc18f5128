"""Splitting the model's output into content, reasoning and tool calls, as it streams."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

try:
    from ..tools import OutputParser
except ImportError:  # the tool-call parser (branch `tools`) has not landed yet
    OutputParser = None

# Gemma 4 control tokens: <|name>, <name|>, <|name|> (and the <|"|> string delimiter)
CONTROL = re.compile(r'<\|[a-z_"]+\|?>|<[a-z_"]+\|>')


@dataclass
class Delta:
    kind: str  # "content" | "reasoning"
    text: str
    tool_call: Any = None


class ThoughtSplitter:
    """Thought channel (`<|channel>thought\\n ... <channel|>`) -> reasoning, the rest -> content,
    with every control token removed. Text that may be the start of a marker is held back."""

    OPEN, CLOSE = "<|channel>", "<channel|>"

    def __init__(self, thinking: bool = False) -> None:
        self.buffer, self.inside = "", False

    def feed(self, text: str) -> list[Delta]:
        self.buffer += text
        out = []
        while True:
            marker = self.CLOSE if self.inside else self.OPEN
            at = self.buffer.find(marker)
            if at < 0:
                break
            out += self._emit(self.buffer[:at])
            self.buffer = self.buffer[at + len(marker) :]
            self.inside = not self.inside
            if self.inside and self.buffer.startswith("thought\n"):
                self.buffer = self.buffer[len("thought\n") :]
        hold = self.buffer.rfind("<")
        if hold >= 0 and ">" not in self.buffer[hold:]:
            ready, self.buffer = self.buffer[:hold], self.buffer[hold:]
        else:
            ready, self.buffer = self.buffer, ""
        return out + self._emit(ready)

    def finish(self) -> list[Delta]:
        rest, self.buffer = self.buffer, ""
        return self._emit(rest)

    def _emit(self, text: str) -> list[Delta]:
        text = CONTROL.sub("", text)
        return [Delta("reasoning" if self.inside else "content", text)] if text else []


def make_parser(thinking: bool, forced: str = "") -> Any:
    """A streaming parser of one answer; `forced` is text written after the generation prompt
    (the start of a required tool call), which the parser reads before the model's own output."""
    parser = OutputParser(thinking=thinking) if OutputParser is not None else ThoughtSplitter(thinking)
    if forced:
        parser.feed(forced)
    return parser
