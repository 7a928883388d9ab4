"""Next-token estimation (paper §4.1, Figure 2): token identity vs logit lens vs affine lens.

Each text gives one source position (seeded random by default). p_L is the model's own
next-token distribution there; each method predicts that token from block ℓ's state alone:
- token_identity: patch the state into the identity prompt's last position at block ℓ* (= ℓ);
- logit_lens: read the state through the final norm and unembedding;
- affine_lens: map it first with a least-squares affine map to the last block's output
  (fitted on held-out texts, both before the final norm, so the norm is applied once).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from omegaconf import DictConfig

from patchscan.api.lenses import AffineLens, LogitLens
from patchscan.data.texts import load_texts
from patchscan.engine import Patch
from patchscan.errors import UserError
from patchscan.experiments.base import Experiment
from patchscan.metrics.stats import grouped_mean_se
from patchscan.runs.row_schema import next_token_columns

METHODS = ("token_identity", "logit_lens", "affine_lens")


def identity_prompt(view, cfg) -> str:
    """The identity prompt: fixed, or built from k random vocabulary tokens (paper App. B.3)."""
    k = int(cfg.get("random_pairs") or 0)
    if k <= 0:
        return cfg.target_prompt
    rng = random.Random(int(cfg.get("prompt_seed", 0)))
    vocab = sorted(view.tokenizer.get_vocab().values())
    if k > len(vocab):  # more words than tokens: refused before drawing any
        _check_usable_words(view, vocab, k)
    words: list[str] = []
    seen: set[str] = set()  # membership in O(1): a list made the loop O(k²)
    tries = 0
    while len(words) < k:
        word = view.tokenizer.decode([rng.choice(vocab)]).strip()
        if len(word) >= 2 and word.isalnum() and word not in seen:
            words.append(word)
            seen.add(word)
        tries += 1
        if tries == 10_000 + 2 * k:  # slow going: are there k usable words at all?
            _check_usable_words(view, vocab, k)
    return "".join(f"{w} -> {w}\n" for w in words) + cfg.placeholder


def _check_usable_words(view, vocab: list[int], k: int) -> None:
    """Refuse patchscope.random_pairs=k when the vocabulary has fewer than k usable words."""
    usable = {w for w in (view.tokenizer.decode([t]).strip() for t in vocab) if len(w) >= 2 and w.isalnum()}
    if len(usable) < k:
        raise UserError(
            f"patchscope.random_pairs={k} is more than the {len(usable)} usable words "
            f"(alphanumeric, 2+ characters) of {view.name}'s vocabulary; use at most {len(usable)}"
        )


class NextTokenExperiment(Experiment):
    name = "next_token"
    position_specs = ("random", "last", "one")

    def __init__(self, cfg: DictConfig):
        super().__init__(cfg)
        self.methods = list(cfg.get("methods") or METHODS)
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise UserError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        self.texts = load_texts(cfg.dataset)

    def bind(self, view, target_view=None) -> None:
        super().bind(view)
        cfg = self.cfg
        self.set_target_prompt(identity_prompt(view, cfg.patchscope))
        self.set_layer_pairs()
        n_train = int(cfg.affine_lens.train_texts) if "affine_lens" in self.methods else 0
        if n_train and self.source_site != "resid_post":  # its maps are fitted between block outputs
            raise UserError(
                f"affine_lens maps block outputs: with patchscope.source_site={self.source_site!r} "
                "leave it out (methods=[token_identity,logit_lens])"
            )
        self.train_texts, self.eval_texts = self.held_out(self.texts, n_train, "affine_lens.train_texts")
        self.lenses = {"logit_lens": LogitLens(view)}
        if n_train:
            self.lenses["affine_lens"] = self._affine_lens()
        self.maps = self.lenses["affine_lens"].maps if n_train else {}

    def _affine_lens(self) -> AffineLens:
        """Block ℓ -> last block maps fitted on the held-out texts (cached by content), by the engine."""
        acfg = self.cfg.affine_lens
        maps = self.engine.fit_lens_maps(
            self.view,
            self.train_texts,
            self.source_layers,
            positions_per_text=int(acfg.positions_per_text),
            max_positions=int(acfg.max_positions),
            ridge=float(acfg.ridge),
            batch_size=self.capture_batch_size(),
        )
        return AffineLens(self.view, maps)

    def examples(self) -> list[dict]:
        src = self.cfg.source
        out, need = [], max(int(src.min_tokens), int(src.min_position) + 1)
        self.example_drops = Counter()
        for i, text in enumerate(self.eval_texts):
            ids = self.view.encode(text)[: int(src.max_tokens)]
            if len(ids) < need:
                self.example_drops[f"texts shorter than {need} tokens (source.min_tokens, source.min_position)"] += 1
                continue
            position = self.source_positions(len(ids), i, low=int(src.min_position))[0]
            out.append({"example_id": str(i), "text": text, "ids": ids[: position + 1], "position": position})
            if self.limit_reached(out):
                break
        if not out:
            raise UserError(
                f"no text of the dataset has at least source.min_tokens={src.min_tokens} tokens "
                f"and more than source.min_position={src.min_position} ({len(self.eval_texts)} texts left out)"
            )
        return out

    def _row(self, e: dict, cap, method: str, source_layer: int, target: tuple, pred: int) -> dict:
        """One row: the run's columns, then the prediction scored against p_L (DESIGN §2). A lens
        reads out at the last block's output, so its rows' target site is resid_post."""
        target_ids, target_position, target_layer, prompt = target
        p_l, decode = cap.logprobs[0], self.view.tokenizer.decode
        ref = int(p_l.argmax())
        site = None if method == "token_identity" else "resid_post"
        return {
            **self.run_columns(e, method, source_layer, target_ids, target_position, target_layer, site),
            **next_token_columns(
                source_text=e["text"],
                target_prompt=prompt,
                pred_token_id=pred,
                ref_token_id=ref,
                pred_token=decode([pred]),
                ref_token=decode([ref]),
                precision_at_1=pred == ref,
                surprisal=-p_l[pred],
            ),
        }

    def _lens_rows(self, method: str, examples: list[dict], caps) -> list[dict]:
        """Rows of a lens: each source block's states read out directly (ℓ* is the last block)."""
        rows, last = [], self.view.n_blocks - 1
        for layer in self.source_layers:
            h = torch.stack([c.at(layer) for c in caps])
            preds = self.lenses[method](h, layer).argmax(-1).tolist()
            for e, cap, pred in zip(examples, caps, preds):
                rows.append(self._row(e, cap, method, layer, (e["ids"], e["position"], last, None), int(pred)))
        return rows

    def _identity_rows(self, examples: list[dict], caps, progress: Callable[[int], None]) -> list[dict]:
        """Rows of token identity: every (ℓ, ℓ*) pair patched into the identity prompt."""
        targets = [self._identity_target(e) for e in examples]
        patches = [
            Patch(
                target_ids=tuple(ids), target_position=pos, target_layer=t, vector=c.at(s), target_site=self.target_site
            )
            for c, (ids, pos, _) in zip(caps, targets)
            for s, t in self.pairs
        ]
        top = self.engine.patched_next_token(self.view, patches, top_k=1, progress=progress, **self.batching())
        preds = iter(top.ids[:, 0].tolist())
        return [
            self._row(e, c, "token_identity", s, (ids, pos, t, prompt), next(preds))
            for e, c, (ids, pos, prompt) in zip(examples, caps, targets)
            for s, t in self.pairs
        ]

    def run_chunk(self, examples: list[dict], progress: Callable[[int], None]) -> pd.DataFrame:
        caps = self.capture_sources(examples, with_logprobs=True)
        rows: list[dict] = []
        for method in self.methods:
            if method == "token_identity":
                rows += self._identity_rows(examples, caps, progress)
            else:
                rows += self._lens_rows(method, examples, caps)
        return self.frame(rows)

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
        by = NextTokenExperiment.best_target(metrics)
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

        by = NextTokenExperiment.best_target(metrics)
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
