"""Target prompts with a placeholder, and finding token positions by character offsets.

The placeholder (and any span: a subject, a phrase) is found as a whole word, never as a letter of
another word ("x" is not the x of "fox"), and mapped to whole tokens through the tokenizer's offset
mapping, so the patched position is the token the placeholder is, whatever else the prompt says.
"""

from __future__ import annotations

import re

from patchscan.errors import UserError
from patchscan.models.view import ModelView


def word_spans(text: str, word: str) -> list[tuple[int, int]]:
    """Character spans (start, end) of `word` in `text` where it stands as a word of its own: no
    word character (letter, digit, _) right before or after it."""
    return [(m.start(), m.end()) for m in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", text)]


def _around(text: str, start: int, end: int, room: int = 12) -> str:
    return (
        ("…" if start > room else "")
        + text[max(0, start - room) : end + room]
        + ("…" if end + room < len(text) else "")
    )


def find_word(text: str, word: str, what: str, occurrence: int | None = None) -> tuple[int, int]:
    """The character span of `word` as a whole word in `text`. With several, `occurrence` picks one
    (0 the first, -1 the last); None means it must be unique, so an ambiguous prompt is refused."""
    if not word:
        raise UserError(f"the {what} is empty; use a word of the prompt, e.g. x")
    spans = word_spans(text, word)
    if not spans:
        raise UserError(f"{text!r} does not contain the {what} {word!r} as a word of its own")
    if occurrence is None:
        if len(spans) > 1:
            shown = "; ".join(f"character {s}: {_around(text, s, e)!r}" for s, e in spans)
            raise UserError(
                f"the {what} {word!r} occurs {len(spans)} times in {text!r} ({shown}); choose one with "
                "occurrence= (0 the first, -1 the last; patchscope.placeholder_occurrence in a config)"
            )
        return spans[0]
    if isinstance(occurrence, bool) or not isinstance(occurrence, int) or not -len(spans) <= occurrence < len(spans):
        raise UserError(
            f"occurrence={occurrence!r} of the {what} {word!r}: it occurs {len(spans)} time(s) in {text!r}; "
            f"use a whole number from {-len(spans)} to {len(spans) - 1}"
        )
    return spans[occurrence]


def tokens_of_span(view: ModelView, text: str, start: int, end: int, what: str) -> tuple[list[int], int, int]:
    """Tokenize `text`; its ids and the first and last token covering characters [start, end).

    A covering token that reaches into a word character outside the span (the span is part of a
    token with more of a word) is refused: patching it would patch more than the span."""
    enc = view.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    covering = [i for i, (s, e) in enumerate(offsets) if e > s and s < end and e > start]
    if not covering:
        raise UserError(f"no token covers the {what} {text[start:end]!r} at character {start} of {text!r}")
    first, last = covering[0], covering[-1]
    outside = text[offsets[first][0] : start] + text[end : offsets[last][1]]
    if re.search(r"\w", outside):
        token = text[offsets[first][0] : offsets[last][1]]
        raise UserError(
            f"the {what} {text[start:end]!r} at character {start} of {text!r} is part of the token {token!r}, "
            "which holds more of a word; put a space or punctuation around it"
        )
    return ids, first, last


def token_index_of_char(view: ModelView, text: str, char_index: int) -> tuple[list[int], int]:
    """Tokenize `text`; return its ids and the index of the token covering character `char_index`."""
    enc = view.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    for i, (start, end) in enumerate(offsets):
        if start <= char_index < end:
            return ids, i
    raise UserError(f"no token covers character {char_index} of {text!r}")


def placeholder_position(
    view: ModelView, prompt: str, placeholder: str, occurrence: int | None = None
) -> tuple[list[int], int]:
    """Token ids of a target prompt and the position of its placeholder's token (the placeholder
    as a whole word; unique unless `occurrence` picks one)."""
    start, end = find_word(prompt, placeholder, "placeholder", occurrence)
    ids, first, last = tokens_of_span(view, prompt, start, end, "placeholder")
    if first != last:
        raise UserError(
            f"the placeholder {placeholder!r} is {last - first + 1} tokens in the target prompt "
            f"{prompt!r}; one state is patched at one position, so use a placeholder that is one token "
            "(e.g. x or ?)"
        )
    return ids, last


def fill_placeholder(prompt: str, placeholder: str, text: str, occurrence: int | None = None) -> tuple[str, int, int]:
    """The prompt with its placeholder (found as `placeholder_position` finds it) replaced by `text`,
    and the character span of `text` in it."""
    start, end = find_word(prompt, placeholder, "placeholder", occurrence)
    return prompt[:start] + text + prompt[end:], start, start + len(text)


def span_last_token(view: ModelView, text: str, span: str) -> tuple[list[int], int]:
    """Token ids of `text` and the position of the last token of the last whole-word occurrence of
    `span` (a subject or phrase: the last one is where the model has read it all)."""
    start, end = find_word(text, span.strip(), "text", -1)
    ids, _, last = tokens_of_span(view, text, start, end, "text")
    return ids, last
