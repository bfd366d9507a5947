"""The committed recipes (``recipes/``): every standard model on every GPU cluster preset at
1, 8 and 64 nodes, planned and written as Megatron-Bridge override YAMLs whose comment
header holds the plan, its predicted figures, the Megatron-LM flags and the NeMo overrides.

Staleness is decided exactly without re-planning: the search is deterministic, so a recipe
is current when neither its inputs (the composed model, cluster, batch and solver settings)
nor the planner's code changed since it was written. Each recipe records a fingerprint of
both; the code part hashes the tokens (without comments and docstrings) of every module the
planning and rendering code can reach. ``python recipes/generate.py`` regenerates what is stale.
"""

from __future__ import annotations

import ast
import dataclasses
import fnmatch
import hashlib
import io
import json
import re
import textwrap
import tokenize
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path

import uniap_megatron
from uniap_megatron.errors import UniapError
from uniap_megatron.spec.config import PlanRequest

NODES = (1, 8, 64)
GLOBAL_BATCH_SIZE = {1: 128, 8: 512, 64: 2048}
"""Global batch per node count: 16 sequences per GPU on one node, then growing more slowly
with the cluster as pre-training recipes do."""
SKIP_MODELS = ("custom", "tiny*")
"""A model given on the command line, and the toy models for tests and CPU runs."""
SKIP_CLUSTERS = ("cpu",)

ROOTS = ("uniap_megatron.recipe_grid", "uniap_megatron.planner")
"""Where the code that decides a recipe's bytes starts; everything they import (at the top
or inside functions) is part of it."""
NOT_DECIDING = ("uniap_megatron.cli",)
"""Composes the request, which is fingerprinted itself."""


@dataclass(frozen=True, order=True)
class GridPoint:
    model: str
    cluster: str
    nodes: int

    @property
    def name(self) -> str:
        return f"{self.model}/{self.cluster}_{self.nodes}n"

    @property
    def path(self) -> Path:
        """Relative to the recipes directory."""
        return Path(f"{self.name}.yaml")

    @property
    def overrides(self) -> list[str]:
        return [
            f"model={self.model}",
            f"cluster={self.cluster}",
            f"cluster.num_nodes={self.nodes}",
            f"train.global_batch_size={GLOBAL_BATCH_SIZE[self.nodes]}",
        ]


def _choices(group: str, skip: tuple[str, ...]) -> list[str]:
    folder = resources.files("uniap_megatron.hydra_configs").joinpath(group)
    names = (p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(n for n in names if not any(fnmatch.fnmatchcase(n, pattern) for pattern in skip))


def grid() -> list[GridPoint]:
    return [
        GridPoint(model=m, cluster=c, nodes=n)
        for m in _choices("model", SKIP_MODELS)
        for c in _choices("cluster", SKIP_CLUSTERS)
        for n in NODES
    ]


def requests(points: list[GridPoint]) -> dict[GridPoint, PlanRequest]:
    """Each point's request, composed exactly as ``uniap-megatron plan <overrides>`` does."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from uniap_megatron.cli import CONFIG_MODULE
    from uniap_megatron.spec.config import request_from_config

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
        return {p: request_from_config(compose(config_name="config", overrides=p.overrides)) for p in points}


# ------------------------------------------------------------------ fingerprints
def _docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    lines.update(range(body[0].lineno, body[0].end_lineno + 1))
        # Attribute docstrings: a bare string right after an assignment in a class body.
        if isinstance(node, ast.ClassDef):
            for stmt in node.body[1:]:
                if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
                    lines.update(range(stmt.lineno, stmt.end_lineno + 1))
    return lines


def code_tokens(source: str) -> list[str]:
    """A module's tokens without comments, docstrings and layout-only whitespace."""
    skip = _docstring_lines(ast.parse(source))
    out = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING, tokenize.ENDMARKER):
            continue
        if tok.start[0] in skip and tok.type in (tokenize.STRING, tokenize.NEWLINE):
            continue
        out.append({tokenize.INDENT: "<indent>", tokenize.DEDENT: "<dedent>", tokenize.NEWLINE: "<nl>"}.get(tok.type, tok.string))
    return out


def _module_file(root: Path, name: str) -> Path | None:
    parts = name.split(".")[1:]
    for path in (root.joinpath(*parts).with_suffix(".py") if parts else None, root.joinpath(*parts, "__init__.py")):
        if path is not None and path.is_file():
            return path
    return None  # a name imported from a module, not a module


def planner_files() -> list[Path]:
    """The modules the recipe code can reach through ``uniap_megatron`` imports."""
    root = Path(uniap_megatron.__file__).parent
    seen: dict[str, Path] = {}
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in seen or name in NOT_DECIDING:
            continue
        path = _module_file(root, name)
        if path is None:
            continue
        seen[name] = path
        todo += [".".join(name.split(".")[:k]) for k in range(1, name.count(".") + 1)]  # parent packages
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("uniap_megatron"):
                todo += [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("uniap_megatron")]
    return sorted(seen.values())


def code_digest() -> str:
    """A hash of the code that decides a plan and its recipe."""
    root = Path(uniap_megatron.__file__).parent
    h = hashlib.sha256()
    for path in planner_files():
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update("\x1f".join(code_tokens(path.read_text())).encode() + b"\0")
    return h.hexdigest()


def _plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def fingerprint(request: PlanRequest, digest: str) -> str:
    document = {"request": _plain(request), "code": digest, "version": uniap_megatron.__version__}
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()


# ------------------------------------------------------------------ rendering
def _comment_block(title: str, words: list[str], width: int = 96) -> list[str]:
    import shlex

    text = " ".join(shlex.quote(w) for w in words)
    wrapped = textwrap.wrap(text, width=width - 4, break_long_words=False, break_on_hyphens=False)
    return [title] + [f"  {line}" for line in wrapped]


def render_recipe(point: GridPoint, plan, fp: str) -> str:
    from uniap_megatron.emit.nemo import nemo_overrides
    from uniap_megatron.emit.megatron_args import model_args
    from uniap_megatron.emit.recipe import recipe_yaml

    p, s, c = plan.prediction, plan.strategy, plan.cluster
    solver = plan.to_dict(with_timing=False).get("solver", {})
    status = "proven optimal" if solver.get("status") == "optimal" else f"best found (gap {solver.get('gap', 0):.2%})"
    lines = [
        f"uniap-megatron recipe: {plan.model.name} on {c.num_nodes} x {c.gpus_per_node} {c.gpu} ({c.name}), "
        f"global batch {plan.train.global_batch_size}, sequence {plan.train.seq_length}, {plan.train.precision.value}",
        "Generated by `python recipes/generate.py`; do not edit (tests/test_recipes.py checks it is current).",
        f"fingerprint: {fp}",
        "",
        f"strategy: {s.short()}",
        f"layout: {plan.layout.to_megatron()}",
        f"predicted: step {p.step_time_s:.3f} s, {p.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {p.mfu:.1%}",
        "peak memory per pipeline rank (GiB): " + " ".join(f"{m:.1f}" for m in p.peak_memory_gib)
        + f" of {p.memory_capacity_gib:.1f}",
        f"solver: {status}",
        "",
        "Megatron-Bridge: merge this file onto the recipe's ConfigContainer (--config-file).",
        *_comment_block("Megatron-LM (pretrain_gpt.py):", plan.megatron_args + model_args(plan.model)),
        *_comment_block("NeMo 1.x (megatron_gpt_pretraining.py):", nemo_overrides(plan)),
    ]
    header = "".join(f"# {line}".rstrip() + "\n" for line in lines)
    return recipe_yaml(plan, header=header)


@dataclass(frozen=True)
class Outcome:
    """One grid point's result: a recipe, or why nothing fits."""

    point: GridPoint
    fingerprint: str
    recipe: str | None = None
    summary: dict | None = None
    reason: str | None = None

    def index_entry(self) -> dict:
        entry = {"model": self.point.model, "cluster": self.point.cluster, "nodes": self.point.nodes,
                 "fingerprint": self.fingerprint}
        if self.recipe is not None:
            entry["recipe"] = self.point.path.as_posix()
            entry.update(self.summary or {})
        else:
            entry["does_not_fit"] = self.reason
        return entry


def plan_point(point: GridPoint, request: PlanRequest, fp: str) -> Outcome:
    from uniap_megatron.planner import plan_request

    try:
        plan = plan_request(request)
    except UniapError as err:
        return Outcome(point=point, fingerprint=fp, reason=str(err))
    summary = {
        "gpus": plan.cluster.world_size,
        "global_batch_size": plan.train.global_batch_size,
        "strategy": plan.strategy.short(),
        "step_time_s": round(plan.prediction.step_time_s, 4),
        "mfu": round(plan.prediction.mfu, 4),
        "peak_memory_gib": round(max(plan.prediction.peak_memory_gib), 1),
    }
    return Outcome(point=point, fingerprint=fp, recipe=render_recipe(point, plan, fp), summary=summary)


def render_index(entries: list[dict]) -> str:
    return json.dumps(entries, indent=1) + "\n"


def render_readme(entries: list[dict]) -> str:
    lines = [
        "# Recipes",
        "",
        "Generated by `python recipes/generate.py` (do not edit): every standard model on every GPU",
        "cluster preset at 1, 8 and 64 nodes, with global batch "
        + ", ".join(f"{b} on {n} node{'s' if n > 1 else ''}" for n, b in GLOBAL_BATCH_SIZE.items()) + ".",
        "Each YAML merges onto a Megatron-Bridge recipe (`--config-file`); its header holds the plan, the",
        "predicted figures, the Megatron-LM flags and the NeMo 1.x overrides. `tests/test_recipes.py`",
        "fails when a recipe no longer matches the planner or its inputs.",
        "",
        "| model | cluster | nodes | GPUs | global batch | strategy | step s | MFU | peak GiB |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for e in entries:
        if "recipe" in e:
            lines.append(
                f"| [{e['model']}]({e['recipe']}) | {e['cluster']} | {e['nodes']} | {e['gpus']} | "
                f"{e['global_batch_size']} | {e['strategy']} | {e['step_time_s']:.3f} | {e['mfu']:.1%} | "
                f"{e['peak_memory_gib']:.1f} |"
            )
        else:
            need = re.search(r"needs ([\d.,]+ GiB per GPU)", e["does_not_fit"])
            why = f"does not fit in memory (needs {need.group(1)})" if need else "no valid strategy"
            lines.append(f"| {e['model']} | {e['cluster']} | {e['nodes']} | | | {why} | | | |")
    return "\n".join(lines) + "\n"
