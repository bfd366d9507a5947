"""The global choices the outer search enumerates, honouring the user's pins.

Every strategy yielded here passes :func:`uniap_megatron.space.rules.violations`. Three
choices are narrowed where the cost model proves them dominated, unless pinned:
sequence parallelism is always on with tp > 1 (same communication volume, less memory),
the distributed optimizer is always on (same volume, less memory), and tensor parallelism
stays inside a node. Full recomputation is searched as ``block`` with every count up to
the largest even stage (``block`` with every layer equals ``uniform`` with groups of one)
and as ``uniform`` with groups of 2 to 4 layers, which keep fewer checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass, fields
from functools import lru_cache

from uniap_megatron.errors import InfeasibleError, InputError
from uniap_megatron.space.layout import Layout
from uniap_megatron.space.rules import (
    cp_violation,
    divisors,
    ep_violation,
    microbatch_violation,
    recompute_violations,
    tp_violation,
    violations,
)
from uniap_megatron.space.strategy import Recompute, RecomputeMethod, Strategy
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.spec.model import ModelSpec
from uniap_megatron.spec.train import TrainSpec

UNIFORM_GROUPS = (2, 3, 4)


@dataclass(frozen=True, kw_only=True)
class Pins:
    """Strategy fields the user fixed; ``None`` means "optimize"."""

    tp: int | None = None
    pp: int | None = None
    vpp: int | None = None
    cp: int | None = None
    ep: int | None = None
    dp: int | None = None
    sp: bool | None = None
    mbs: int | None = None
    recompute: Recompute | None = None
    recompute_method: RecomputeMethod | None = None
    recompute_num_layers: int | None = None
    distributed_optimizer: bool | None = None
    layout: str | None = None

    def __post_init__(self) -> None:
        for f in ("tp", "pp", "vpp", "cp", "ep", "dp", "mbs", "recompute_num_layers"):
            value = getattr(self, f)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"strategy.{f} ({value!r}) must be a positive integer or null (optimize).")
        for f in ("sp", "distributed_optimizer"):
            value = getattr(self, f)
            if value is not None and not isinstance(value, bool):
                raise InputError(f"strategy.{f} ({value!r}) must be true, false or null (optimize).")
        for f, enum in (("recompute", Recompute), ("recompute_method", RecomputeMethod)):
            value = getattr(self, f)
            if value is not None:
                try:
                    object.__setattr__(self, f, enum(value))
                except ValueError:
                    allowed = ", ".join(e.value for e in enum)
                    raise InputError(f"strategy.{f} ({value!r}) must be one of: {allowed}, or null.") from None

    def pinned(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def complete(self) -> bool:
        """Every field that defines a plan is pinned (the layout included)."""
        return self.layout is not None and all(
            getattr(self, f) is not None for f in ("tp", "cp", "ep", "dp", "mbs", "recompute")
        )


def _options(pinned, natural: list) -> list:
    return [pinned] if pinned is not None else natural


def check_pins(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: Pins) -> None:
    """Reject a pin that no strategy can satisfy on its own, saying what would work.
    Combinations of pins that exclude each other are explained by :func:`explain_empty`."""
    world = cluster.world_size
    gpus = f"{world} GPUs = {cluster.num_nodes} node{'s' if cluster.num_nodes > 1 else ''} x {cluster.gpus_per_node}"
    for name in ("tp", "cp", "pp", "dp"):
        value = getattr(pins, name)
        if value is not None and world % value:
            good = divisors(world)
            if name == "tp":
                good = [t for t in good if tp_violation(model, t) is None]
            elif name == "cp":
                good = [c for c in good if cp_violation(train, c) is None]
            raise InputError(
                f"strategy.{name} ({value}) must divide the number of GPUs ({gpus}); "
                f"valid {name} here: {_list(good)}."
            )
    if pins.tp is not None and (problem := tp_violation(model, pins.tp)):
        good = [t for t in divisors(world) if tp_violation(model, t) is None]
        raise InputError(f"{problem}; valid tp here: {_list(good)}.")
    if pins.cp is not None and (problem := cp_violation(train, pins.cp)):
        good = [c for c in divisors(world) if cp_violation(train, c) is None]
        raise InputError(f"{problem}; valid cp here: {_list(good)}.")
    if pins.sp and pins.tp == 1:
        raise InputError(
            "strategy.sp (true) needs strategy.tp > 1: sequence parallelism splits over the TP group; "
            "pin strategy.tp to 2 or more, or unpin strategy.sp."
        )
    if pins.vpp is not None and pins.vpp > 1 and pins.pp == 1:
        raise InputError(
            f"strategy.vpp ({pins.vpp}) needs strategy.pp > 1: interleaving splits each pipeline rank's "
            "layers into virtual stages; pin strategy.pp to 2 or more, or set strategy.vpp=1."
        )
    if pins.ep is not None and pins.ep > 1 and not model.is_moe:
        raise InputError(f"strategy.ep ({pins.ep}) must be 1: model {model.name} has no experts.")
    if pins.ep is not None and model.is_moe and model.num_moe_experts % pins.ep:
        raise InputError(
            f"strategy.ep ({pins.ep}) must divide model.num_moe_experts ({model.num_moe_experts}); "
            f"valid ep: {_list(divisors(model.num_moe_experts))}."
        )
    for name in ("mbs", "dp"):
        value = getattr(pins, name)
        if value is not None and train.global_batch_size % value:
            raise InputError(
                f"train.global_batch_size ({train.global_batch_size}) must be divisible by strategy.{name} "
                f"({value}); pin a divisor of {train.global_batch_size} or change the batch size to a "
                f"multiple of {value}."
            )
    if pins.mbs is not None and pins.dp is not None and train.global_batch_size % (pins.mbs * pins.dp):
        raise InputError(
            f"train.global_batch_size ({train.global_batch_size}) must be divisible by strategy.mbs x "
            f"strategy.dp ({pins.mbs} x {pins.dp} = {pins.mbs * pins.dp})."
        )
    if pins.recompute is not None and pins.recompute is not Recompute.FULL:
        for name in ("recompute_method", "recompute_num_layers"):
            if getattr(pins, name) is not None:
                raise InputError(
                    f"strategy.{name} ({getattr(pins, name)}) applies only to strategy.recompute=full, "
                    f"not {pins.recompute}; unpin one of them."
                )
    if pins.layout is not None:
        _check_layout(model, pins)


def layout_pp_options(pins: Pins) -> tuple[int, list[int]]:
    """Stages of the pinned layout and the pipeline sizes it allows with the other pins."""
    stages = len(Layout.parse(pins.layout, 1).stages)
    options = [p for p in divisors(stages) if pins.pp in (None, p)]
    if pins.vpp is not None:
        options = [p for p in options if p * pins.vpp == stages]
    return stages, [p for p in options if p > 1 or stages == 1]


def _check_layout(model: ModelSpec, pins: Pins) -> None:
    stages, pp_options = layout_pp_options(pins)
    if not pp_options:
        if pins.pp is not None and stages % pins.pp:
            reason = f"which is not a multiple of strategy.pp ({pins.pp})"
        elif pins.pp is not None and pins.vpp is not None:
            reason = f"but strategy.pp x strategy.vpp is {pins.pp} x {pins.vpp} = {pins.pp * pins.vpp}"
        elif pins.vpp is not None:
            reason = (
                f"so strategy.vpp ({pins.vpp}) would need pp = {stages} / {pins.vpp}"
                + (", but interleaving needs pp > 1" if stages == pins.vpp else ", which is not a whole number")
            )
        else:
            reason = "but a layout of several stages needs strategy.pp > 1"
        raise InputError(
            f"strategy.layout has {stages} stages, {reason}; a layout holds pp x vpp stages "
            "separated by '|'."
        )
    layout = Layout.parse(pins.layout, pp_options[-1])
    layout.validate(num_layers=model.num_layers, mtp_num_layers=model.mtp_layers)


def _list(values: list[int]) -> str:
    return ", ".join(str(v) for v in values[:16]) + (" ..." if len(values) > 16 else "")


@lru_cache(maxsize=1024)
def recompute_options(pins: Pins, max_stage_layers: int) -> tuple[tuple[Recompute, RecomputeMethod | None, int | None], ...]:
    """(granularity, method, count) choices searched for stages of up to
    ``max_stage_layers`` layers, honouring the pins."""
    rec, method, n = pins.recompute, pins.recompute_method, pins.recompute_num_layers
    if rec is None and (method is not None or n is not None):
        rec = Recompute.FULL
    options: list[tuple[Recompute, RecomputeMethod | None, int | None]] = []
    for r in _options(rec, list(Recompute)):
        if r is not Recompute.FULL:
            options.append((r, None, None))
            continue
        for m in _options(method, [RecomputeMethod.BLOCK, RecomputeMethod.UNIFORM]):
            if m is RecomputeMethod.BLOCK:
                counts = [n] if n is not None else range(1, max_stage_layers + 1)
                options.extend((r, m, k) for k in counts)
            else:
                groups = [n] if n is not None else [1] if method is RecomputeMethod.UNIFORM else []
                if n is None:
                    groups += [k for k in UNIFORM_GROUPS if k <= max_stage_layers]
                options.extend((r, m, k) for k in groups)
    return tuple(options)


@dataclass(frozen=True)
class Family:
    """Strategies that share tp, cp, pp, dp, ep and mbs. The search bounds a family before
    it looks at its members (vpp, sp, recompute, distributed optimizer)."""

    tp: int
    cp: int
    pp: int
    dp: int
    ep: int
    mbs: int
    vpps: tuple[int, ...]
    """Virtual stages per rank its members may use."""
    sps: tuple[bool, ...]
    recomputes: tuple[Recompute, ...]
    """Recompute granularities its members may use."""


def enumerate_strategies(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: Pins = Pins()
) -> Iterator[Strategy]:
    """Every strategy of the searched space that satisfies Megatron's rules and the pins,
    in a fixed order."""
    for family in strategy_families(model, cluster, train, pins):
        yield from family_strategies(model, train, pins, family)


def strategy_families(
    model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: Pins = Pins()
) -> Iterator[Family]:
    """The families of :func:`enumerate_strategies`, in the same order; a family may turn
    out to have no valid member."""
    world, gpn = cluster.world_size, cluster.gpus_per_node
    layout_stages = len(Layout.parse(pins.layout, 1).stages) if pins.layout else None
    max_stages = model.num_layers + 2
    tps = _options(pins.tp, [t for t in divisors(world) if t <= gpn and tp_violation(model, t) is None])
    for tp in tps:
        for cp in _options(pins.cp, [c for c in divisors(world // tp) if cp_violation(train, c) is None]):
            if world % (tp * cp):
                continue
            for pp in _options(pins.pp, [p for p in divisors(world // (tp * cp)) if p <= max_stages]):
                if world % (tp * cp * pp):
                    continue
                dp = world // (tp * cp * pp)
                if pins.dp is not None and pins.dp != dp:
                    continue
                if train.global_batch_size % dp:
                    continue
                local = train.global_batch_size // dp
                eps = [1] if not model.is_moe else [e for e in divisors(model.num_moe_experts)]
                for ep in _options(pins.ep, eps):
                    if ep_violation(model, ep, dp, cp):
                        continue
                    for mbs in _options(pins.mbs, divisors(local)):
                        if local % mbs:
                            continue
                        m = local // mbs
                        yield Family(
                            tp=tp, cp=cp, pp=pp, dp=dp, ep=ep, mbs=mbs,
                            vpps=tuple(_vpps(pins, pp, m, layout_stages, max_stages)),
                            sps=tuple(_options(pins.sp, [tp > 1])),
                            recomputes=tuple(dict.fromkeys(r for r, _, _ in recompute_options(pins, 1))),
                        )


def _vpps(pins: Pins, pp: int, m: int, layout_stages: int | None, max_stages: int) -> list[int]:
    if layout_stages is not None:
        if layout_stages % pp:
            return []
        vpps = [layout_stages // pp]
    else:
        vpps = [v for v in range(1, max_stages // pp + 1) if v == 1 or (pp > 1 and m >= pp and m % pp == 0)]
    return [v for v in _options(pins.vpp, vpps) if layout_stages is None or v * pp == layout_stages]


def family_strategies(model: ModelSpec, train: TrainSpec, pins: Pins, family: Family) -> Iterator[Strategy]:
    """The valid strategies of one family, in a fixed order."""
    f = family
    for vpp in f.vpps:
        max_stage_layers = -(-model.num_layers // (f.pp * vpp))
        for sp in f.sps:
            for rec, method, n in recompute_options(pins, max_stage_layers):
                for distopt in _options(pins.distributed_optimizer, [True]):
                    s = Strategy(
                        tp=f.tp, pp=f.pp, vpp=vpp, cp=f.cp, ep=f.ep, dp=f.dp, sp=sp, mbs=f.mbs,
                        recompute=rec, recompute_method=method, recompute_num_layers=n,
                        distributed_optimizer=distopt,
                    )
                    if not _valid(model, train, s):
                        continue
                    yield s


def _valid(model: ModelSpec, train: TrainSpec, s: Strategy) -> bool:
    return _shape_valid(train, s) and _recompute_valid(s)


def _shape_valid(train: TrainSpec, s: Strategy) -> bool:
    if cp_violation(train, s.cp, s.tp, s.sp) or microbatch_violation(train, s):
        return False
    return not (s.sp and s.tp == 1 or s.vpp > 1 and s.pp == 1)


def _recompute_valid(s: Strategy) -> bool:
    return not [p for p in recompute_violations(s) if "needs strategy.recompute_num_layers" not in p]


@lru_cache(maxsize=4096)
def _valid_recomputes(pins: Pins, max_stage_layers: int, recompute: Recompute | None) -> int:
    return sum(
        _recompute_valid(Strategy(tp=1, pp=1, dp=1, recompute=r, recompute_method=m, recompute_num_layers=n))
        for r, m, n in recompute_options(pins, max_stage_layers)
        if recompute is None or r is recompute
    )


def family_size(
    model: ModelSpec, train: TrainSpec, pins: Pins, family: Family, *,
    sp: bool | None = None, recompute: Recompute | None = None,
) -> int:
    """How many strategies :func:`family_strategies` yields (those with ``sp`` and
    ``recompute`` when given), without building them all."""
    (sizes,) = family_sizes(model, train, pins, [family])
    return sum(n for (with_sp, rec), n in sizes.items()
               if (sp is None or with_sp == sp) and (recompute is None or rec is recompute))


def family_sizes(
    model: ModelSpec, train: TrainSpec, pins: Pins, families: list[Family],
) -> list[dict[tuple[bool, Recompute], int]]:
    """Members of each family per (sp, recompute granularity). Validity splits into the
    pipeline shape (vpp, sp) and the recompute choice, so nothing is built per member,
    and each shape is checked once for all the families (expert sizes) that share it."""
    distopts = len(_options(pins.distributed_optimizer, [True]))
    shapes: dict[tuple, bool] = {}
    recomputes: dict[int, dict[Recompute, int]] = {}
    out = []
    for f in families:
        sizes = {(sp, rec): 0 for sp in f.sps for rec in f.recomputes}
        for vpp in f.vpps:
            max_stage_layers = -(-model.num_layers // (f.pp * vpp))
            counts = recomputes.get(max_stage_layers)
            if counts is None:
                counts = recomputes[max_stage_layers] = {
                    rec: _valid_recomputes(pins, max_stage_layers, rec) for rec in Recompute
                }
            for sp in f.sps:
                key = (f.tp, f.pp, vpp, f.cp, f.dp, sp, f.mbs)
                valid = shapes.get(key)
                if valid is None:
                    shape = Strategy(tp=f.tp, pp=f.pp, vpp=vpp, cp=f.cp, ep=f.ep, dp=f.dp, sp=sp, mbs=f.mbs)
                    valid = shapes[key] = _shape_valid(train, shape)  # ep plays no part
                if valid:
                    for rec in f.recomputes:
                        sizes[sp, rec] += counts[rec] * distopts
        out.append(sizes)
    return out


def explain_empty(model: ModelSpec, cluster: ClusterSpec, train: TrainSpec, pins: Pins) -> InfeasibleError:
    """Why the pins leave no strategy: the rules that the closest strategy breaks, and
    which pin to drop or which batch size would leave valid strategies."""
    world = cluster.world_size
    closest = min(_probes(model, cluster, train, pins), key=lambda t: (len(t[0]), t[1]))[0]
    reason = "; ".join(closest) if closest else "no combination of the free fields satisfies Megatron's rules"
    pinned = ", ".join(f"strategy.{k}={v}" for k, v in pins.pinned().items())
    fixes = []
    relaxable = [
        name for name in pins.pinned()
        if next(enumerate_strategies(model, cluster, train, dataclasses.replace(pins, **{name: None})), None)
    ]
    if relaxable:
        fixes.append("unpin " + " or ".join(f"strategy.{name}" for name in relaxable))
    batch = _nearest_batch(model, cluster, train, pins)
    if batch:
        fixes.append(f"use train.global_batch_size={batch[0]}" + (f" or {batch[1]}" if len(batch) > 1 else ""))
    advice = (" To get a valid strategy, " + ", or ".join(fixes) + ".") if fixes else ""
    return InfeasibleError(
        f"No valid Megatron strategy for {model.name} on {world} GPUs"
        + (f" with {pinned}" if pinned else "")
        + f": the closest one breaks Megatron's rules: {reason}.{advice}"
    )


def _probes(model, cluster, train, pins) -> Iterator[tuple[list[str], tuple]]:
    """Strategies that honour every pin and fill the GPUs, with the rules each breaks."""
    world = cluster.world_size
    layout_stages = len(Layout.parse(pins.layout, 1).stages) if pins.layout else None
    for tp in _options(pins.tp, divisors(world)):
        for cp in _options(pins.cp, divisors(world)):
            for pp in _options(pins.pp, divisors(world)):
                dp = world // (tp * cp * pp) if world % (tp * cp * pp) == 0 else 0
                if pins.dp is not None:
                    dp = pins.dp
                if dp < 1:
                    continue
                vpp = pins.vpp or (layout_stages // pp if layout_stages and layout_stages % pp == 0 else 1)
                recompute = pins.recompute or (Recompute.FULL if pins.recompute_method else Recompute.NONE)
                method = pins.recompute_method or (RecomputeMethod.BLOCK if recompute is Recompute.FULL else None)
                n = pins.recompute_num_layers or (1 if recompute is Recompute.FULL else None)
                s = Strategy(
                    tp=tp, pp=pp, vpp=vpp, cp=cp, ep=pins.ep or 1, dp=dp,
                    sp=pins.sp if pins.sp is not None else tp > 1, mbs=pins.mbs or 1,
                    recompute=recompute, recompute_method=method, recompute_num_layers=n,
                )
                problems = violations(model, cluster, train, s)
                if layout_stages and layout_stages != pp * vpp:
                    problems.append(
                        f"strategy.layout has {layout_stages} stages, not strategy.pp x strategy.vpp "
                        f"({pp} x {vpp} = {pp * vpp})"
                    )
                yield problems, (tp * cp * pp, tp, pp, cp)


def _nearest_batch(model, cluster, train, pins, *, tries: int = 64) -> list[int]:
    """The closest global batch sizes, below and above, that leave valid strategies."""
    found = []
    for direction in (-1, 1):
        for k in range(1, tries + 1):
            gbs = train.global_batch_size + direction * k
            if gbs < 1:
                break
            other = dataclasses.replace(train, global_batch_size=gbs)
            if next(enumerate_strategies(model, cluster, other, pins), None):
                found.append(gbs)
                break
    return found
