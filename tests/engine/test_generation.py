"""Generation that stops when the answer is decided: the shared answer-end rules, the engine's
per-row stops against the naive method, and metrics equal with and without stopping."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from patchscan.engine import Patch, capture, generate
from patchscan.engine.decoding import truncate_at_stop
from patchscan.experiments.prompts import placeholder_position
from patchscan.metrics.answers import StopAfterDescription, StopWhenFound, description_decided, first_description
from patchscan.metrics.text import contains_answer
from tests.conftest import tiny
from tests.helpers import compose
from tests.reference import naive_generate

ROOT = Path(__file__).resolve().parents[2]
ENTITY_PROMPT = (
    "Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: South Korean multinational "
    "major appliance and consumer electronics corporation, x"
)
GENERATIONS = [
    ": German composer and pianist, Paris: Capital of France",
    "'s: Chinese currency, x: Chinese currency, x: Chinese currency",
    " Capital of France\nmore",
    ": American actor, born 1974, known for Titanic, x: more",
    ": city, lowercase name: a thing",
    " :: ",
    ": Italian city, famous for pizza and the Vesuvius volcano",
]


def test_next_item_starting_lowercase_ends_the_description():
    assert first_description("'s: Chinese currency, x: Chinese currency, x: …") == "'s: Chinese currency"
    assert first_description(": a river, x: a river, x:") == "a river"
    assert first_description(": German composer and pianist, Paris: Capital of France") == "German composer and pianist"
    assert first_description(": American actor, born 1974") == "American actor, born 1974"  # no colon: one item


@pytest.mark.parametrize("generation", GENERATIONS)
def test_a_decided_description_never_changes_with_more_text(generation):
    decided_at = None
    for k in range(len(generation) + 1):
        if description_decided(generation[:k]):
            decided_at = k if decided_at is None else decided_at
            assert first_description(generation[:k]) == first_description(generation)
        else:
            assert decided_at is None, "decided is monotone in the text"


def test_found_answer_is_monotone_in_the_text():
    stop = StopWhenFound("Washington D.C.")
    text = " is Washington D. C., the capital"
    hits = [stop(text[:k]) for k in range(len(text) + 1)]
    assert hits.index(True) == len(" is Washington D. C.")
    assert all(hits[hits.index(True) :])


@pytest.mark.parametrize("name", ["tiny_gpt2", "tiny_llama", "tiny_neox"])
def test_stopped_generation_equals_the_naive_one_cut_at_its_stop(name):
    """Rows with and without stops, patched and unpatched, stopping at different steps: each equals
    the naive full-length continuation cut where its stop first holds."""
    view = tiny(name)
    torch.manual_seed(0)
    ids = tuple(view.encode("The capital city of x is"))
    vectors = torch.randn(6, view.width, dtype=view.dtype)
    patches = [
        Patch(target_ids=ids, target_position=4, target_layer=k % view.n_blocks, vector=vectors[k]) for k in range(6)
    ]
    patches += [Patch(target_ids=ids[: 3 + k], target_position=2 + k, target_layer=0, vector=None) for k in range(2)]
    full = [naive_generate(view, p, 12) for p in patches]
    stops = []
    for k, tokens in enumerate(full):  # an answer that appears after 2..6 tokens, or no stop at all
        at = 2 + k % 5
        stops.append(None if k % 4 == 3 else StopWhenFound(view.decode(tokens[at - 1 : at]) or "?"))
    stopped = generate(view, patches, max_new_tokens=12, stops=stops, batch_size=4)
    expected = [truncate_at_stop(view, t, s) for t, s in zip(full, stops)]
    assert stopped == expected
    assert sum(len(t) for t in stopped) < sum(len(t) for t in full), "some rows must stop early"


@pytest.fixture(scope="module")
def entity_generations(builtin_view):
    view = builtin_view
    ids, pos = placeholder_position(view, ENTITY_PROMPT, "x")
    names = ["Albert Einstein", "Coca-Cola"]
    caps = capture(view, [view.encode(n) for n in names], [2, 6, 10], [[-1]] * len(names))
    patches = [
        Patch(target_ids=tuple(ids), target_position=pos, target_layer=t, vector=c.at(s))
        for c in caps
        for s, t in ((2, 2), (6, 6), (10, 10), (6, 2))
    ]
    full = generate(view, patches, max_new_tokens=50)
    stopped = generate(view, patches, max_new_tokens=50, stops=[StopAfterDescription()] * len(patches))
    return view, full, stopped


def test_entity_descriptions_equal_with_and_without_stopping(entity_generations):
    view, full, stopped = entity_generations
    assert [first_description(view.decode(t)) for t in stopped] == [first_description(view.decode(t)) for t in full]
    assert sum(map(len, stopped)) < 0.6 * sum(map(len, full)), "descriptions end well before 50 tokens"


def test_attribute_correctness_equal_with_and_without_stopping(builtin_view):
    view = builtin_view
    ids, pos = placeholder_position(view, "The capital city of x", "x")
    subjects = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo"}
    caps = capture(view, [view.encode(s) for s in subjects], [3, 8], [[-1]] * len(subjects))
    patches, answers = [], []
    for cap, answer in zip(caps, subjects.values()):
        for s, t in ((3, 3), (8, 3), (8, 8)):
            patches.append(Patch(target_ids=tuple(ids), target_position=pos, target_layer=t, vector=cap.at(s)))
            answers.append(answer)
    filled = [
        Patch(
            target_ids=tuple(view.encode(f"The capital city of {s}")), target_position=-1, target_layer=0, vector=None
        )
        for s in subjects
    ]
    patches += filled
    answers += list(subjects.values())
    stops = [StopWhenFound(a) for a in answers]
    full = generate(view, patches, max_new_tokens=20)
    stopped = generate(view, patches, max_new_tokens=20, stops=stops)
    correct = [contains_answer(view.decode(t), a) for t, a in zip(full, answers)]
    assert [contains_answer(view.decode(t), a) for t, a in zip(stopped, answers)] == correct
    assert any(correct), "the built-in model answers some of these"
    assert stopped == [truncate_at_stop(view, t, s) for t, s in zip(full, stops)]


def _scope(overrides):
    from patchscan.experiments import get_experiment

    cfg = compose(*overrides)
    return get_experiment(cfg.experiment.name)(cfg)


@pytest.mark.parametrize("stop", [True, False])
def test_scopes_record_stop_when_correct(stop):
    view = tiny("tiny_llama")
    common = ["sweep.source_layers=[1]", "sweep.target_layers=[0]", f"generation.stop_when_correct={stop}"]
    for experiment, extra in (
        (
            "attribute_extraction",
            [f"dataset.path={ROOT / 'tests/fixtures/lre'}", "dataset.limit=2", "probe.enabled=false"],
        ),
        ("entity_resolution", ["dataset.limit=2", "similarity.embedding=false"]),
    ):
        scope = _scope([f"experiment={experiment}", *common, *extra])
        scope.bind(view)
        df = scope.run_chunk(scope.examples(), lambda n: None)
        assert df["stop_when_correct"].tolist() == [stop] * len(df)


def test_bf16_runs_the_whole_engine_on_cpu_and_says_when_the_cpu_lacks_it(caplog, monkeypatch):
    from patchscan.engine import patched_next_token
    from patchscan.models import dtypes, load_model

    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset({"avx2"}))
    with caplog.at_level("WARNING"):
        view = load_model(
            {"source": "tiny", "arch": "llama", "name": "tiny_llama", "device": "cpu", "dtype": "bfloat16"}
        )
    assert [r.message for r in caplog.records if "bfloat16" in r.message] == [
        "model.dtype=bfloat16 on CPU: this CPU has no native bf16: bf16 matmuls are emulated and usually slower "
        "than fp32 (float32 is the CPU default)"
    ]
    assert view.dtype == torch.bfloat16
    ids = tuple(view.encode("The capital city of x"))
    cap = capture(view, [view.encode("France")], [1], [[-1]])[0]
    patches = [Patch(target_ids=ids, target_position=-1, target_layer=t, vector=cap.at(1)) for t in (0, 2)]
    assert cap.at(1).dtype == torch.bfloat16
    gens = generate(view, patches, max_new_tokens=4, stops=[StopWhenFound("Paris")] * 2)
    assert gens == [truncate_at_stop(view, naive_generate(view, p, 4), StopWhenFound("Paris")) for p in patches]
    assert patched_next_token(view, patches, top_k=1).ids.shape == (2, 1)
