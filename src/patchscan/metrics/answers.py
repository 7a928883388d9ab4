"""Where an answer ends: one definition, shared by the scorers and by the decoding stop.

A scorer reads a generation's answer; generation may stop as soon as that answer can no longer
change, so a stopped row scores exactly as its full-length generation would. Each rule here is
monotone in the text: once decided on a prefix of the decoded tokens, more tokens cannot change
what the scorer reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from patchscan.metrics.text import contains_answer

# The next few-shot item: ", Name:". The name may start with any character that is not a space,
# comma or colon: the placeholder itself ("x") and lower-case names end a description too.
_NEXT_ITEM = re.compile(r",\s*[^\s,:][^,:]{0,60}:")


def _description_span(generation: str) -> tuple[str, bool]:
    """(the first description, whether it is decided: a newline or the next item has been seen)."""
    line, newline, _ = generation.partition("\n")
    text = line.lstrip(" :")
    match = _NEXT_ITEM.search(text)
    return (text[: match.start()] if match else text).strip(), bool(newline) or match is not None


def first_description(generation: str) -> str:
    """The description the model wrote for x: up to the next line or the next 'Name:' item."""
    return _description_span(generation)[0]


def description_decided(generation: str) -> bool:
    """True once more text cannot change `first_description` (a newline or the next item is there)."""
    return _description_span(generation)[1]


@dataclass(frozen=True)
class StopAfterDescription:
    """Stop a row once its first description is decided (entity descriptions)."""

    def __call__(self, text: str) -> bool:
        return description_decided(text)


@dataclass(frozen=True)
class StopWhenFound:
    """Stop a row once its expected answer appears (attribute and multi-hop correctness).

    `contains_answer` ignores spaces, so what it finds in a prefix it finds in every longer text.
    """

    answer: str
    case_sensitive: bool = True

    def __call__(self, text: str) -> bool:
        return contains_answer(text, self.answer, self.case_sensitive)
