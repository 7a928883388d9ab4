"""Next-token estimation (paper §4.1, Figure 2): token identity vs logit lens vs affine lens.

Each text gives one source position (seeded random by default). p_L is the model's own
next-token distribution there; each method predicts that token from block ℓ's state alone:
- token_identity: patch the state into the identity prompt's last position at block ℓ* (= ℓ);
- logit_lens: read the state through the final norm and unembedding;
- affine_lens: map it first with a least-squares affine map to the last block's output
  (fitted on held-out texts, both before the final norm, so the norm is applied once).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from patchscan.caches import map_cache_key, model_fingerprint
from patchscan.data.texts import load_texts
from patchscan.engine import Affine, Identity, Patch, capture, load_mapping
from patchscan.errors import UserError
from patchscan.metrics.stats import grouped_mean_se
from patchscan.models.loading import cache_root
from patchscan.prompts import placeholder_position
from patchscan.scopes.base import Scope
from patchscan.sweep import layer_pairs, parse_positions

log = logging.getLogger(__name__)
METHODS = ("token_identity", "logit_lens", "affine_lens")


def identity_prompt(view, cfg) -> str:
    """The identity prompt: fixed, or built from k random vocabulary tokens (paper App. B.3)."""
    k = int(cfg.get("random_pairs") or 0)
    if k <= 0:
        return cfg.target_prompt
    rng = random.Random(int(cfg.get("prompt_seed", 0)))
    vocab = sorted(view.tokenizer.get_vocab().values())
    words: list[str] = []
    tries = 0
    while len(words) < k:
        word = view.tokenizer.decode([rng.choice(vocab)]).strip()
        if len(word) >= 2 and word.isalnum() and word not in words:
            words.append(word)
        tries += 1
        if tries == 10_000 + 2 * k:  # slow going: are there k usable words at all?
            usable = {w for w in (view.tokenizer.decode([t]).strip() for t in vocab) if len(w) >= 2 and w.isalnum()}
            if len(usable) < k:
                raise UserError(
                    f"patchscope.random_pairs={k} is more than the {len(usable)} usable words "
                    f"(alphanumeric, 2+ characters) of {view.name}'s vocabulary; use at most {len(usable)}"
                )
    return "".join(f"{w} -> {w}\n" for w in words) + cfg.placeholder


class NextTokenScope(Scope):
    name = "next_token"

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.methods = list(cfg.get("methods") or METHODS)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise UserError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        self.texts = load_texts(cfg.dataset)

    def bind(self, view) -> None:
        super().bind(view)
        cfg = self.cfg
        self.prompt = identity_prompt(view, cfg.patchscope)
        self.target_ids, self.target_position = placeholder_position(view, self.prompt, cfg.patchscope.placeholder)
        self.pairs = layer_pairs(cfg.sweep.source_layers, cfg.sweep.target_layers, view.n_blocks, view.n_blocks)
        self.source_layers = sorted({s for s, _ in self.pairs})
        n_train = int(cfg.affine_lens.train_texts) if "affine_lens" in self.methods else 0
        if n_train >= len(self.texts):
            raise UserError(
                f"affine_lens.train_texts={n_train} leaves no text to evaluate (the dataset has {len(self.texts)})"
            )
        self.train_texts = self.texts[len(self.texts) - n_train :] if n_train else []
        self.eval_texts = self.texts[: len(self.texts) - n_train]
        self.maps = self._affine_maps() if n_train and not self.planning else {}
        if self.planning and n_train:  # a dry run fits nothing (and must not cache maps)
            self.maps = {layer: Identity() for layer in self.source_layers}

    def examples(self) -> list[dict]:
        src = self.cfg.source
        limit = self.cfg.dataset.get("limit")
        seed = int(self.cfg.runner.seed)
        out = []
        for i, text in enumerate(self.eval_texts):
            ids = self.view.encode(text)[: int(src.max_tokens)]
            if len(ids) < max(int(src.min_tokens), int(src.min_position) + 1):
                continue
            spec = self.cfg.sweep.source_positions
            if spec == "random":
                position = random.Random(f"{seed}-{i}").randint(int(src.min_position), len(ids) - 1)
            else:
                positions = parse_positions(spec if isinstance(spec, (str, int)) else list(spec), len(ids))
                if len(positions) != 1:
                    raise UserError(f"sweep.source_positions={spec!r}: next_token takes random, last or one position")
                position = positions[0]
            out.append({"example_id": str(i), "text": text, "ids": ids[: position + 1], "position": position})
            if limit and len(out) >= int(limit):
                break
        if not out:
            raise UserError(
                f"no text of the dataset has at least source.min_tokens={src.min_tokens} tokens "
                f"and more than source.min_position={src.min_position}"
            )
        return out

    def _affine_maps(self) -> dict[int, Affine]:
        """Least-squares maps from each block's output to the last block's output, cached on disk."""
        view, acfg = self.view, self.cfg.affine_lens
        ids = [view.encode(t)[: int(acfg.positions_per_text)] for t in self.train_texts]
        key = map_cache_key(
            "affine_lens", model_fingerprint(view), str(view.dtype), ids, int(acfg.max_positions), float(acfg.ridge)
        )
        folder = cache_root() / "maps" / view.name / f"affine-lens-{key}"
        last = view.n_blocks - 1
        if all((folder / f"block{b}.pt").exists() for b in self.source_layers):
            return {b: load_mapping(folder / f"block{b}.pt") for b in self.source_layers}
        log.info("fitting affine-lens maps on %d held-out texts", len(ids))
        caps = capture(
            view,
            ids,
            self.source_layers + [last],
            [list(range(len(x))) for x in ids],
            batch_size=self.capture_batch_size(),
        )
        states = torch.cat([c.states for c in caps], dim=1)[:, : int(acfg.max_positions)]
        if states.shape[1] <= view.width // 4:
            raise UserError(
                f"affine_lens: only {states.shape[1]} training positions; add texts or raise affine_lens.train_texts"
            )
        maps = {}
        for k, layer in enumerate(self.source_layers):
            maps[layer] = Affine.fit(states[k], states[-1], ridge=float(acfg.ridge))
            maps[layer].save(folder / f"block{layer}.pt")
        return maps

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        view, last = self.view, self.view.n_blocks - 1
        caps = self.engine.capture(
            view,
            [e["ids"] for e in examples],
            self.source_layers,
            [[e["position"]] for e in examples],
            batch_size=self.capture_batch_size(),
            with_logprobs=True,
        )
        rows: list[dict] = []

        def add(e, cap, method, source_layer, target_ids, target_position, target_layer, prompt, pred):
            p_l = cap.logprobs[0]
            rows.append(
                {
                    "example_id": e["example_id"],
                    "method": method,
                    **self.common_columns(),
                    "source_text": e["text"],
                    "source_token_ids": e["ids"],
                    "source_position": e["position"],
                    "source_layer": source_layer,
                    "target_prompt": prompt,
                    "target_token_ids": list(target_ids),
                    "target_position": target_position,
                    "target_layer": target_layer,
                    "pred_token_id": int(pred),
                    "ref_token_id": int(p_l.argmax()),
                    "pred_token": view.tokenizer.decode([int(pred)]),
                    "ref_token": view.tokenizer.decode([int(p_l.argmax())]),
                    "precision_at_1": bool(int(pred) == int(p_l.argmax())),
                    "surprisal": float(-p_l[int(pred)]),
                }
            )

        for method in self.methods:
            if method in ("logit_lens", "affine_lens"):
                for layer in self.source_layers:
                    h = torch.stack([c.at(layer) for c in caps])
                    if method == "affine_lens":
                        h = self.maps[layer](h)
                    preds = view.readout(h).argmax(-1).tolist()
                    for e, cap, pred in zip(examples, caps, preds):
                        add(e, cap, method, layer, e["ids"], e["position"], last, None, pred)
            else:
                targets = [self._identity_target(e) for e in examples]
                patches = [
                    Patch(target_ids=tuple(ids), target_position=pos, target_layer=t, vector=cap.at(s))
                    for cap, (ids, pos, _) in zip(caps, targets)
                    for s, t in self.pairs
                ]
                top = self.engine.patched_next_token(view, patches, top_k=1, progress=progress, **self.batching())
                k = 0
                for e, cap, (ids, pos, prompt) in zip(examples, caps, targets):
                    for s, t in self.pairs:
                        add(e, cap, method, s, ids, pos, t, prompt, top.ids[k, 0])
                        k += 1
        return pd.DataFrame(rows)

    def _identity_target(self, e: dict) -> tuple[list[int], int, str]:
        """The token-identity target: the few-shot prompt, or with `patchscope.single_token_prompt` the
        paper's B.3 ablation, pad tokens with the source token kept at its source position."""
        if not self.cfg.patchscope.get("single_token_prompt"):
            return self.target_ids, self.target_position, self.prompt
        pad = self.view.tokenizer.pad_token_id
        ids = [int(pad)] * e["position"] + [int(e["ids"][e["position"]])]
        return ids, e["position"], "[PAD] ... [PAD] " + self.view.decode(ids[-1:])

    @staticmethod
    def metrics(df: pd.DataFrame, cfg: DictConfig) -> dict:
        table = grouped_mean_se(df, ["method", "source_layer", "target_layer"], ["precision_at_1", "surprisal"])
        overall = grouped_mean_se(df, ["method"], ["precision_at_1", "surprisal"])
        return {
            "experiment": "next_token",
            "n_examples": int(df["example_id"].nunique()),
            "by_layer": table,
            "overall": overall,
        }

    @staticmethod
    def best_target(metrics: dict) -> pd.DataFrame:
        """Per (method, source block), the row of the target block with the best precision@1 (the only
        one where ℓ* is fixed by the method): what the table prints and the figure draws."""
        by = pd.DataFrame(metrics["by_layer"])
        by = by[by.groupby(["method", "source_layer"])["precision_at_1"].transform("max") == by["precision_at_1"]]
        return by.drop_duplicates(["method", "source_layer"])

    @staticmethod
    def report(metrics: dict) -> str:
        by = NextTokenScope.best_target(metrics)
        prec = by.pivot(index="source_layer", columns="method", values="precision_at_1")
        surp = by.pivot(index="source_layer", columns="method", values="surprisal")
        table = prec.add_suffix(" p@1").join(surp.add_suffix(" surprisal"))
        return (
            f"next-token estimation, {metrics['n_examples']} examples "
            "(precision@1 higher is better, surprisal in nats lower is better)\n"
            + table.to_string(float_format=lambda x: f"{x:.3f}")
        )

    @staticmethod
    def plot(df: pd.DataFrame, metrics: dict, run_dir: Path) -> list[Path]:
        from patchscan.plots.curves import method_curves

        by = NextTokenScope.best_target(metrics)
        several = pd.DataFrame(metrics["by_layer"]).groupby(["method", "source_layer"]).size().max() > 1
        title = f"Next-token estimation ({metrics['n_examples']} texts" + (
            ", best target block ℓ*)" if several else ")"
        )
        return [
            method_curves(
                by,
                ["precision_at_1", "surprisal"],
                ["precision@1", "surprisal (nats)"],
                run_dir / "next_token.png",
                title=title,
            )
        ]
