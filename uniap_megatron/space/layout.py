"""Megatron's ``pipeline_model_parallel_layout``: which layers each virtual stage holds.

Grammar (megatron/core/transformer/pipeline_parallel_layer_layout.py): letters ``E t m L``,
stages separated by ``|``, ``(...)*n`` and ``x*n`` repeat (no nesting), commas are
cosmetic. Stage ``i`` runs on pipeline rank ``i % pp`` as virtual chunk ``i // pp``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import groupby

from uniap_megatron.errors import InputError

_LETTERS = frozenset("EtmL")
_GROUP = re.compile(r"\(([^)]+)\)\*(\d+)")
_REPEAT = re.compile(r"(.)\*(\d+)")


@dataclass(frozen=True)
class Layout:
    """Virtual stages in layer order, each a string of layer letters (``"Etttt"``)."""

    stages: tuple[str, ...]
    pp: int

    def __post_init__(self) -> None:
        assert self.pp >= 1 and len(self.stages) % self.pp == 0, (self.stages, self.pp)

    # ------------------------------------------------------------------ shape
    @property
    def vpp(self) -> int:
        return len(self.stages) // self.pp

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def rank_of(self, stage: int) -> int:
        return stage % self.pp

    def chunk_of(self, stage: int) -> int:
        return stage // self.pp

    def stages_of_rank(self, rank: int) -> list[int]:
        return [rank + chunk * self.pp for chunk in range(self.vpp)]

    def count(self, letter: str, stage: int | None = None) -> int:
        if stage is None:
            return sum(s.count(letter) for s in self.stages)
        return self.stages[stage].count(letter)

    def decoder_ranges(self) -> list[range]:
        """The decoder layer indices each stage holds (layers are placed in order)."""
        ranges, start = [], 0
        for stage in self.stages:
            n = stage.count("t")
            ranges.append(range(start, start + n))
            start += n
        return ranges

    # ------------------------------------------------------------- formatting
    def to_megatron(self) -> str:
        """The compact string Megatron parses, e.g. ``Et*3|(t*4|)*6,t*3L``.

        Three or more equal consecutive stages become ``(X|)*n``; that expands to n copies
        each followed by ``|``, so the very last stage always stays outside a group.
        """
        texts = [_compress_stage(s) for s in self.stages]
        tokens: list[str] = []
        i = 0
        while i < len(texts):
            j = i
            while j + 1 < len(texts) - 1 and texts[j + 1] == texts[i]:
                j += 1
            if j - i + 1 >= 3 and texts[i]:
                tokens.append(f"({texts[i]}|)*{j - i + 1},")
            else:
                tokens.extend(t + "|" for t in texts[i : j + 1])
            i = j + 1
        return "".join(tokens)[:-1] if tokens else ""

    def __str__(self) -> str:
        return self.to_megatron()

    # ----------------------------------------------------------------- parsing
    @classmethod
    def parse(cls, text: str, pp: int) -> Layout:
        """Parse a layout string with Megatron's grammar; errors name ``strategy.layout``."""
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"strategy.layout ({text!r}) must be a non-empty layout string such as 'Et*4|t*4L'.")
        flat = text.replace(",", "").replace(" ", "")
        flat = _GROUP.sub(lambda m: m.group(1) * int(m.group(2)), flat)
        flat = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), flat)
        bad = sorted(set(flat) - _LETTERS - {"|"})
        if bad:
            raise InputError(
                f"strategy.layout ({text!r}) contains {''.join(bad)!r}; only the letters E (embedding), "
                "t (decoder layer), m (MTP layer), L (loss), '|' between stages, '(...)*n' and 'x*n' "
                "are allowed, without nesting."
            )
        stages = tuple(flat.split("|"))
        if len(stages) % pp:
            raise InputError(
                f"strategy.layout ({text!r}) has {len(stages)} stages, which is not a multiple of "
                f"pipeline_model_parallel_size ({pp}); use pp x vpp stages."
            )
        return cls(stages=stages, pp=pp)

    def validate(self, *, num_layers: int, mtp_num_layers: int = 0) -> None:
        """Megatron's own rules for a layout (``validate_layer_layout``), as input errors."""
        flat = "".join(self.stages)
        where = f"strategy.layout ({self.to_megatron()!r})"
        if not flat.startswith("E") or flat.count("E") != 1:
            raise InputError(f"{where} must start with the embedding 'E' and hold it exactly once.")
        if not flat.endswith("L") or flat.count("L") != 1:
            raise InputError(f"{where} must end with the loss 'L' and hold it exactly once.")
        if flat.count("t") != num_layers or flat.count("m") != mtp_num_layers:
            letter, field, held, want = (
                ("t", "num_layers", flat.count("t"), num_layers)
                if flat.count("t") != num_layers
                else ("m", "mtp_num_layers", flat.count("m"), mtp_num_layers)
            )
            example = even_layout(num_layers=num_layers, pp=self.pp, vpp=self.vpp, mtp_num_layers=mtp_num_layers)
            raise InputError(
                f"{where} holds {held} {'decoder' if letter == 't' else 'MTP'} layers '{letter}' but "
                f"model.{field} is {want}; a layout of {self.num_stages} stages must hold {num_layers} 't'"
                + (f" and {mtp_num_layers} 'm'" if mtp_num_layers else "")
                + f", e.g. {example.to_megatron()!r}."
            )
        if mtp_num_layers:
            if "t" in flat[flat.index("m"):]:
                raise InputError(f"{where}: decoder layers must be placed before MTP layers.")
            holders = [i for i, s in enumerate(self.stages) if "m" in s]
            if len(holders) != 1:
                raise InputError(f"{where}: all MTP layers must be in one virtual stage.")
            if self.chunk_of(holders[0]) != self.vpp - 1:
                raise InputError(f"{where}: MTP layers must be in the last virtual stage of a rank.")


def _compress_stage(stage: str) -> str:
    out = []
    for letter, group in groupby(stage):
        n = len(list(group))
        out.append(letter if n == 1 else f"{letter}*{n}")
    return "".join(out)


def even_layout(
    *, num_layers: int, pp: int, vpp: int = 1, mtp_num_layers: int = 0
) -> Layout:
    """Megatron's default split: decoder layers spread as evenly as possible, E on the first
    stage, MTP and L on the last."""
    stages = pp * vpp
    base, extra = divmod(num_layers, stages)
    # Megatron gives an even split; where it is not exact, put the extra layers in the middle.
    counts = [base] * stages
    for k in range(extra):
        counts[(stages - extra) // 2 + k] += 1
    texts = ["t" * c for c in counts]
    texts[0] = "E" + texts[0]
    texts[-1] = texts[-1] + "m" * mtp_num_layers + "L"
    return Layout(stages=tuple(texts), pp=pp)
