"""What do the built-in model's hidden states say? A first look through the token-identity Patchscope.

For each prompt we take the hidden state of its last token after block ℓ, paste it over the "?"
of a prompt that makes the model repeat tokens ("cat -> cat, 1135 -> 1135, hello -> hello, ?"),
and let the model continue. Early blocks tend to give back the token itself; later blocks give
what the model is about to say next. The logit lens (reading the state directly through the
output layer) is shown beside it.
"""

from __future__ import annotations

import sys

from patchscan.engine import Patch, capture, generate
from patchscan.experiments.prompts import placeholder_position
from patchscan.models import load_model

PROMPTS = [
    "The Eiffel Tower is located in the city of",
    "Water freezes at zero degrees",
    "She opened the door and said hello to her",
    "The largest planet in the solar system is",
]
IDENTITY = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
BLOCKS = [0, 5, 10, 15, 20, 25, 29]


def main() -> None:
    print("Loading the built-in model (SmolLM2-135M; the first run converts it once, about 20 s)...", flush=True)
    view = load_model({"source": "builtin", "name": "smollm2_135m"})
    target_ids, target_pos = placeholder_position(view, IDENTITY, "?")
    print(f"{view.name}: {view.n_blocks} blocks, width {view.width}, on {view.device}\n")
    print(__doc__.split("\n\n", 1)[1])
    prompts = [view.encode(p) for p in PROMPTS]
    caps = capture(view, prompts, BLOCKS, [[-1]] * len(prompts), with_logprobs=True)
    patches = [
        Patch(target_ids=tuple(target_ids), target_position=target_pos, target_layer=b, vector=cap.states[k, 0])
        for cap in caps
        for k, b in enumerate(BLOCKS)
    ]
    continuations = generate(view, patches, max_new_tokens=4)
    for p, (text, cap) in enumerate(zip(PROMPTS, caps)):
        last = view.tokenizer.decode(prompts[p][-1:])
        said = view.tokenizer.decode([int(cap.logprobs[0].argmax())])
        print(f'Prompt: "{text}"   last token {last!r}; the model itself says next: {said!r}')
        lens = view.readout(cap.states[:, 0]).argmax(-1).tolist()
        for k, block in enumerate(BLOCKS):
            cont = view.decode(continuations[p * len(BLOCKS) + k]).split("\n")[0]
            print(
                f"  block {block:2d}: token identity -> {cont.strip()!r:24s} logit lens -> "
                f"{view.tokenizer.decode([lens[k]])!r}"
            )
        print()
    sys.stdout.flush()


if __name__ == "__main__":
    main()
