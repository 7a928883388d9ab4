"""The controls the generating experiments share (issue 28, part 3): what a Patchscope's answer would
be without the information its patched state carries.

Li et al., "Do activation verbalization methods convey privileged information?", score a verbalizer
against the same model given the source text itself and the target question, with no activations:
if that does as well, the benchmark says nothing about internals. Here:

- `source_in_prompt`: an unpatched greedy answer to `controls_template` (default
  "{source}\\n{prompt}"): the text the source state was read from, then the target prompt with its
  placeholder word removed and its whitespace tidied. Li et al. put the source text in an assistant
  turn and "Complete the sentence: " + the question in a user turn of a chat template; the base models
  here get the plain template, and `controls_template="{source}\\nComplete the sentence: {prompt}"`
  writes the paper's prefix. One row per example (no blocks).
- `zero` and `mean`: the Patchscope's own (ℓ, ℓ*) grid with its vector replaced by a zero vector, or by
  the mean source state at block ℓ (and site) over all the dataset's examples at the same kind of
  position. The mean is captured once per run, in `examples()` (before shards split the examples, so
  every shard and every resume uses the same mean over ALL examples, in the same order: deterministic).

`check` reads and checks the `controls:` list (one place, one error line) before any model loads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from omegaconf import ListConfig

from patchscan.errors import UserError

SHARED = ("source_in_prompt", "zero", "mean")
NULL_PATCHES = ("zero", "mean")
DEFAULT_TEMPLATE = "{source}\n{prompt}"
MEAN_BATCH = 256  # source prompts captured per call while the mean is summed (bounds the memory)


def check(cfg, experiment: str, own: Sequence[str] = ()) -> list[str]:
    """The configured `controls` (a list), each one of `own` (the experiment's) or the shared ones;
    `controls_template` must hold {source} and {prompt} and nothing else in braces."""
    value = cfg.get("controls")
    choices = (*own, *SHARED)
    if value is not None and not isinstance(value, ListConfig | list):  # a string would be read letter by letter
        raise UserError(f"controls={value!r} is not a list; use controls=[{', '.join(choices)}] (any of them) or []")
    controls = [str(c) for c in (value or [])]
    bad = next((c for c in controls if c not in choices), None)
    if bad is not None:
        raise UserError(f"unknown control {bad!r} for {experiment}; choose from {', '.join(choices)}")
    twice = next((c for c in controls if controls.count(c) > 1), None)
    if twice is not None:  # its rows would be written twice and weigh double in every mean
        raise UserError(f"controls names {twice!r} twice; name each control once")
    if "source_in_prompt" in controls:
        template(cfg)
    return controls


def template(cfg) -> str:
    """`controls_template`, checked: a format string with {source} and {prompt}."""
    text = str(cfg.get("controls_template") or DEFAULT_TEMPLATE)
    try:
        text.format(source="", prompt="")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"controls_template={text!r} takes only {{source}} and {{prompt}} ({exc})") from None
    if "{source}" not in text or "{prompt}" not in text:
        raise UserError(f"controls_template={text!r} must contain {{source}} and {{prompt}}")
    return text


def without_placeholder(prompt: str, placeholder: str) -> str:
    """The target prompt with its placeholder word removed (as a whole word: the paper's
    `prompt_target.replace('x', '').strip()` would also cut an x out of other words), spaces tidied."""
    text = re.sub(rf"(?<!\w){re.escape(placeholder)}(?!\w)", "", prompt)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r" ([,.;:!?])", r"\1", text)
    return "\n".join(line.strip() for line in text.split("\n")).strip()


def source_in_prompt(cfg, source: str, prompt: str) -> str:
    """The `source_in_prompt` control's text: the source text, then the target prompt without its placeholder."""
    placeholder = str(cfg.patchscope.placeholder)
    return template(cfg).format(source=source.strip(), prompt=without_placeholder(prompt, placeholder))


class NullStates:
    """The vectors of the `zero` and `mean` controls: `means[(kind, block)]` is the mean source state
    over all examples at one kind of source position (e.g. the subject's last token)."""

    def __init__(self, means: dict[tuple[str, int], torch.Tensor] | None = None):
        self.means = means or {}

    @classmethod
    def capture(cls, scope, view, sources: dict[str, list[tuple[list[int], int]]], layers: Sequence[int], sites=None):
        """Means of `sources[kind]` ((token ids, position) per example) at `layers`, through
        `scope.engine.capture` (so a dry run counts it), summed in float64 in a fixed order; read at
        `sites[kind]` (default: the scope's `source_site`)."""
        means = {}
        for kind, items in sources.items():
            keys = list(dict.fromkeys((tuple(ids), int(pos)) for ids, pos in items))
            weight = {k: 0 for k in keys}
            for ids, pos in items:
                weight[(tuple(ids), int(pos))] += 1
            total: torch.Tensor | None = None
            for start in range(0, len(keys), MEAN_BATCH):
                part = keys[start : start + MEAN_BATCH]
                caps = scope.engine.capture(
                    view,
                    [list(k[0]) for k in part],
                    list(layers),
                    [[k[1]] for k in part],
                    batch_size=scope.capture_batch_size(),
                    site=(sites or {}).get(kind, scope.source_site),
                )
                for key, cap in zip(part, caps):
                    term = cap.states[:, 0].detach().to("cpu", torch.float64) * weight[key]
                    total = term if total is None else total + term
            if total is None:
                continue
            dtype = caps[0].states.dtype
            for k, layer in enumerate(layers):
                means[(kind, int(layer))] = (total[k] / len(items)).to(dtype)
        return cls(means)

    def vector(self, control: str, like: torch.Tensor, kind: str = "", layer: int | None = None) -> torch.Tensor:
        """The null vector standing in for the state `like`: zeros of its shape, or the mean at (kind, layer)."""
        if control == "zero":
            return torch.zeros_like(like)
        return self.means[(kind, int(layer))].to(like.device, like.dtype)
