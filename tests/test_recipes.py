"""The committed recipes are current: they cover the grid, and no recipe's inputs or the
planner code that decides it changed since it was generated (the search is deterministic,
so that is exact). One recipe is planned again and compared byte for byte.
Regenerate with ``python recipes/generate.py``."""

from __future__ import annotations

import json

import pytest
from hydra_apps import REPO
from omegaconf import OmegaConf

from uniap_megatron.recipe_grid import (
    GridPoint,
    code_digest,
    code_tokens,
    fingerprint,
    grid,
    plan_point,
    render_index,
    render_readme,
    requests,
)

RECIPES = REPO / "recipes"
FIX = "regenerate them with `python recipes/generate.py` (add --jobs N to plan in parallel)"


@pytest.fixture(scope="module")
def index() -> list[dict]:
    return json.loads((RECIPES / "index.json").read_text())


@pytest.fixture(scope="module")
def current():
    points = grid()
    reqs = requests(points)
    digest = code_digest()
    return reqs, {p: fingerprint(reqs[p], digest) for p in points}


def test_index_covers_the_grid(index):
    listed = [GridPoint(model=e["model"], cluster=e["cluster"], nodes=e["nodes"]) for e in index]
    assert listed == grid(), f"the recipe grid changed; {FIX}"


def test_every_recipe_is_current(index, current):
    _, fps = current
    recorded = {GridPoint(e["model"], e["cluster"], e["nodes"]): e["fingerprint"] for e in index}
    stale = [p.name for p in grid() if recorded.get(p) != fps[p]]
    assert not stale, f"{len(stale)} recipes are stale ({', '.join(stale[:5])}, ...): the planner or its inputs changed; {FIX}"


def test_recipe_files_match_the_index(index):
    on_disk = {p.relative_to(RECIPES).as_posix() for p in RECIPES.glob("*/*.yaml")}
    assert on_disk == {e["recipe"] for e in index if "recipe" in e}, FIX
    for e in index:
        if "recipe" not in e:
            assert e["does_not_fit"]
            continue
        text = (RECIPES / e["recipe"]).read_text()
        assert f"# fingerprint: {e['fingerprint']}\n" in text
        assert f"# strategy: {e['strategy']}\n" in text
        doc = OmegaConf.create(text)
        assert set(doc) == {"model", "train", "ddp", "optimizer"}
        assert doc.train.global_batch_size == e["global_batch_size"]


def test_index_and_readme_are_rendered_from_the_entries(index):
    assert (RECIPES / "index.json").read_text() == render_index(index)
    assert (RECIPES / "README.md").read_text() == render_readme(index), FIX


def test_a_recipe_plans_again_to_the_same_bytes(index, current):
    """Guards the fingerprint itself: planning a committed point again gives its bytes."""
    reqs, fps = current
    point = GridPoint(model="llama2_7b", cluster="dgx_h100", nodes=1)
    outcome = plan_point(point, reqs[point], fps[point])
    assert outcome.recipe is not None
    assert outcome.recipe == (RECIPES / point.path).read_text()
    assert outcome.index_entry() in index


def test_code_digest_ignores_comments_and_docstrings_only():
    source = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    assert code_tokens(source) == code_tokens('def f(x):\n    """Other words."""\n\n    # note\n    return x + 1\n')
    assert code_tokens(source) != code_tokens('def f(x):\n    """Doc."""\n    return x + 2\n')
    assert code_tokens(source) != code_tokens('def f(x):\n    return "Doc." or x + 1\n')
