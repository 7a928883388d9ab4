"""Target prompts with a placeholder, and finding token positions by character offsets."""

from __future__ import annotations

from patchscan.errors import UserError
from patchscan.models.view import ModelView


def token_index_of_char(view: ModelView, text: str, char_index: int) -> tuple[list[int], int]:
    """Tokenize `text`; return its ids and the index of the token covering character `char_index`."""
    enc = view.tokenizer(text, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    for i, (start, end) in enumerate(offsets):
        if start <= char_index < end:
            return ids, i
    raise UserError(f"no token covers character {char_index} of {text!r}")


def placeholder_position(view: ModelView, prompt: str, placeholder: str) -> tuple[list[int], int]:
    """Token ids of a target prompt and the position of its placeholder's last token (last occurrence)."""
    at = prompt.rfind(placeholder) if placeholder else -1
    if at < 0:
        raise UserError(f"target prompt {prompt!r} does not contain the placeholder {placeholder!r}")
    ids, first = token_index_of_char(view, prompt, at)
    _, last = token_index_of_char(view, prompt, at + len(placeholder) - 1)
    if first != last:
        raise UserError(
            f"the placeholder {placeholder!r} is {last - first + 1} tokens in the target prompt "
            f"{prompt!r}; one state is patched at one position, so use a placeholder that is one token "
            "(e.g. x or ?)"
        )
    return ids, last


def span_last_token(view: ModelView, text: str, span: str) -> tuple[list[int], int]:
    """Token ids of `text` and the position of the last token of the last occurrence of `span`."""
    at = text.rfind(span)
    if at < 0:
        raise UserError(f"{span!r} does not occur in {text!r}")
    return token_index_of_char(view, text, at + len(span.rstrip()) - 1)
