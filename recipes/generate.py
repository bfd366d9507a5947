"""Regenerate the recipes in this directory: ``python recipes/generate.py [--jobs N]``.

Only stale recipes are planned again (see ``uniap_megatron/recipe_grid.py`` for what makes
one stale); ``--check`` lists them without planning, ``--force`` plans everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from uniap_megatron.recipe_grid import (
    Outcome,
    code_digest,
    fingerprint,
    grid,
    plan_point,
    render_index,
    render_readme,
    requests,
)

HERE = Path(__file__).resolve().parent
INDEX = HERE / "index.json"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _load_index() -> dict[str, dict]:
    if not INDEX.exists():
        return {}
    return {_name(e): e for e in json.loads(INDEX.read_text())}


def _name(entry: dict) -> str:
    return f"{entry['model']}/{entry['cluster']}_{entry['nodes']}n"


def _write_index(entries: list[dict]) -> None:
    _write(INDEX, render_index(entries))
    _write(HERE / "README.md", render_readme(entries))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1, help="plans solved in parallel (processes)")
    parser.add_argument("--check", action="store_true", help="list stale recipes, plan nothing; exit 1 if any")
    parser.add_argument("--force", action="store_true", help="plan every grid point again")
    args = parser.parse_args(argv)

    points = grid()
    reqs = requests(points)
    digest = code_digest()
    fps = {p: fingerprint(reqs[p], digest) for p in points}
    known = _load_index()
    stale = [p for p in points if args.force or known.get(p.name, {}).get("fingerprint") != fps[p]]
    stale.sort(key=lambda p: (p.nodes, p))  # small clusters first: quick results, slow ones last
    if args.check:
        for p in stale:
            print(f"stale: {p.name}")
        return 1 if stale else 0

    entries = {p.name: known[p.name] for p in points if p.name in known}
    order = {p.name: k for k, p in enumerate(points)}
    started = time.perf_counter()
    # Each result is written as it arrives, so that an interrupted run keeps what it planned.
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = [pool.submit(plan_point, p, reqs[p], fps[p]) for p in stale]
        for done, future in enumerate(as_completed(futures), 1):
            outcome: Outcome = future.result()
            point = outcome.point
            if outcome.recipe is not None:
                _write(HERE / point.path, outcome.recipe)
            else:
                (HERE / point.path).unlink(missing_ok=True)
            entries[point.name] = outcome.index_entry()
            _write_index(sorted(entries.values(), key=lambda e: order[_name(e)]))
            verdict = outcome.summary["strategy"] if outcome.recipe else "does not fit"
            print(f"[{done}/{len(stale)}] {point.name}: {verdict} ({time.perf_counter() - started:.0f} s)",
                  file=sys.stderr, flush=True)
    final = sorted((e for e in entries.values() if _name(e) in order), key=lambda e: order[_name(e)])
    keep = {HERE / e["recipe"] for e in final if "recipe" in e}
    for path in HERE.glob("*/*.yaml"):
        if path not in keep:
            path.unlink()
    for folder in HERE.iterdir():
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    _write_index(final)
    print(f"{len(stale)} planned, {len(points) - len(stale)} current; {len(keep)} recipes.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
