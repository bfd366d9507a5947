"""Plan for a training app's config and write the plan into it, in the app's own keys.

Keys the user set on the command line are pins: the plan honours them and they are left as
the user wrote them. Keys that place layers another way (first/last-stage counts, the
``account_for_*`` flags) are cleared, since Megatron refuses them next to a layout string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from uniap_megatron.emit.nemo import nemo_values
from uniap_megatron.emit.recipe import bridge_values
from uniap_megatron.errors import UniapError
from uniap_megatron.integrations.app_config import (
    OTHER_LAYOUT_KEYS,
    AppRequest,
    AutoParallelSettings,
    Target,
    read_request,
)

_MISSING = object()
ABSENT = object()
"""``Change.old`` for a key the app's config did not hold."""


@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any


@dataclass(frozen=True)
class Injection:
    """What planning did to one job's config."""

    app: AppRequest
    plan: Any  # uniap_megatron.plan.Plan
    settings: AutoParallelSettings
    changes: tuple[Change, ...]


def planned_values(plan, target: Target, layout_style: str) -> dict[str, Any]:
    """The plan under the app's keys, plus the keys that must be cleared for it."""
    if target is Target.NEMO:
        values = nemo_values(plan, layout_style=layout_style)
    else:
        values = bridge_values(plan, layout_style=layout_style)
    return values


def _clearing(cfg: DictConfig, layout_style: str) -> dict[str, Any]:
    """Other ways of placing layers that the app's config holds: cleared for the plan's."""
    if layout_style == "layout":
        keys = OTHER_LAYOUT_KEYS
    else:
        keys = ("model.pipeline_model_parallel_layout",) + OTHER_LAYOUT_KEYS[2:]
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is not _MISSING and value not in (None, False):
            out[key] = False if "account_for" in key else None
    return out


def plan_and_inject(cfg: DictConfig, overrides: list[str], settings: AutoParallelSettings) -> Injection:
    """Plan for ``cfg`` (an app's composed config) and write the plan into it in place.

    Raises :class:`UniapError` with the app's key names in the message; ``cfg`` is left
    untouched then.
    """
    from uniap_megatron.planner import plan_request

    app = read_request(cfg, overrides, settings)
    try:
        plan = plan_request(app.request, profile=settings.profile)
        values = planned_values(plan, app.target, settings.layout_keys)
    except UniapError as err:
        err.args = (app.translate(str(err)),)
        raise
    values = {**_clearing(cfg, settings.layout_keys), **values}
    changes = []
    with read_write(cfg), open_dict(cfg):
        for key, new in values.items():
            if key in app.pinned:
                continue
            old = OmegaConf.select(cfg, key, default=_MISSING)
            if (old is _MISSING and new is None) or (old is not _MISSING and _same(old, new)):
                continue  # an absent key reads as null already
            OmegaConf.update(cfg, key, new, merge=False, force_add=True)
            changes.append(Change(key=key, old=ABSENT if old is _MISSING else _plain(old), new=new))
        if not settings.keep_section and "auto_parallel" in cfg:
            del cfg["auto_parallel"]
    return Injection(app=app, plan=plan, settings=settings, changes=tuple(changes))


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _same(old: Any, new: Any) -> bool:
    old = _plain(old)
    return type(old) is type(new) and old == new
