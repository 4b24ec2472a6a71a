"""The As-ViT search space and its genotype (one topology plus its scale).

String form (ALGORITHMS.md, "As-ViT")::

    K1,S1,E1[,L1]|K2,S2,E2[,L2]|K3,S3,E3[,L3]|K4,S4,E4[,L4]|H[,hidden]

K = kernel of the stage's tokenizer (stage 1: patch-embedding conv; stages 2-4: soft-split merge),
S = window split (window side = grid side // S; S = 1 is global attention), E = FFN expansion,
L = blocks in the stage, H = heads of the last stage (stage i has H / 2^(3-i), at least 1) and
hidden = width E of stage 1.

Canonical string (what ``str(g)`` emits): the depths are written, on every stage, iff they differ
from ``(1, 1, 1, 1)``; hidden is written iff it differs from 32 (the search proxy's width). So
``Genotype.parse(str(g)) == g`` for every genotype, and a string in canonical form comes back
unchanged (both the paper's seed and As-ViT Large are). A stage written without its L has depth 1.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence, Union

__all__ = ["SPACE", "DIMENSIONS", "DEFAULT_DEPTHS", "DEFAULT_HIDDEN", "SEED", "LARGE", "space_size",
           "stage_heads", "stage_widths", "Genotype"]

# One categorical choice per dimension, in the fixed order the topology search samples them.
SPACE: dict[str, tuple[int, ...]] = {
    "K1": (4, 5, 6, 7, 8),
    "K2": (2, 3, 4),
    "K3": (2, 3, 4),
    "K4": (2, 3, 4),
    "S1": (2, 4, 8),
    "S2": (1, 2, 4),
    "S3": (1, 2),
    "S4": (1,),
    "E1": (2, 3, 4, 5, 6),
    "E2": (2, 3, 4, 5, 6),
    "E3": (2, 3, 4, 5, 6),
    "E4": (2, 3, 4, 5, 6),
    "H": (16, 32, 64),
}
DIMENSIONS: tuple[str, ...] = tuple(SPACE)
DEFAULT_DEPTHS: tuple[int, int, int, int] = (1, 1, 1, 1)
DEFAULT_HIDDEN = 32
MAX_WIDTH = 1024  # stage widths are capped here (the released code's min(1024, E * 2^i))
SEED = "8,2,3|4,1,2|4,1,4|4,1,6|32"
LARGE = "8,2,3,5|4,1,2,2|4,1,4,5|4,1,6,2|32,180"

Choices = Union[Mapping[str, int], Sequence[int]]


def space_size() -> int:
    """Number of topologies in SPACE (4,556,250)."""
    return math.prod(len(v) for v in SPACE.values())


def stage_widths(hidden: int) -> tuple[int, int, int, int]:
    """Token width of stages 1-4: min(1024, hidden * 2^i)."""
    return tuple(min(MAX_WIDTH, hidden * 2 ** i) for i in range(4))


def stage_heads(heads: int) -> tuple[int, int, int, int]:
    """Attention heads of stages 1-4: [H/8, H/4, H/2, H], at least 1 each."""
    return tuple(max(1, heads // 2 ** (3 - i)) for i in range(4))


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_tuple(value, name: str) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 4:
        raise ValueError(f"{name} must be a sequence of 4 ints (one per stage), got {value!r}")
    if not all(_is_int(v) for v in value):
        raise TypeError(f"{name} must hold ints, got {value!r}")
    return tuple(value)


def _parse_ints(text: str, where: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise ValueError(f"{where}: expected comma-separated ints, got {text!r}") from None


@dataclass(frozen=True)
class Genotype:
    """One As-ViT architecture: per-stage kernels K, window splits S, FFN expansions E and depths L,
    the last stage's head count H, and hidden = stage-1 width E.

    Construction checks the structure (4 positive ints per field, every stage wide enough for its
    heads); ``validate()`` additionally checks membership in SPACE.
    """

    kernels: tuple[int, int, int, int]
    splits: tuple[int, int, int, int]
    expansions: tuple[int, int, int, int]
    heads: int
    depths: tuple[int, int, int, int] = DEFAULT_DEPTHS
    hidden: int = DEFAULT_HIDDEN

    def __post_init__(self):
        for name in ("kernels", "splits", "expansions", "depths"):
            object.__setattr__(self, name, _int_tuple(getattr(self, name), name))
        for name in ("heads", "hidden"):
            if not _is_int(getattr(self, name)):
                raise TypeError(f"{name} must be an int, got {getattr(self, name)!r}")
        for name, letter in (("kernels", "K"), ("splits", "S"), ("expansions", "E"), ("depths", "L")):
            for i, v in enumerate(getattr(self, name)):
                if v < 1:
                    raise ValueError(f"{letter}{i + 1} must be >= 1, got {v}")
        if self.heads < 1:
            raise ValueError(f"H (heads) must be >= 1, got {self.heads}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        for i, (w, h) in enumerate(zip(self.widths, self.stage_heads)):
            # The head dim is width // heads (the released code's rule), so it only needs width >= heads.
            if w < h:
                raise ValueError(f"hidden={self.hidden} is too narrow for H={self.heads}: stage {i + 1} has "
                                 f"width {w} < {h} heads (need hidden >= H / 8)")

    # ------------------------------------------------------------------ derived shapes

    @property
    def widths(self) -> tuple[int, int, int, int]:
        """Token width per stage: min(1024, hidden * 2^i)."""
        return stage_widths(self.hidden)

    @property
    def stage_heads(self) -> tuple[int, int, int, int]:
        """Heads per stage: [H/8, H/4, H/2, H], at least 1."""
        return stage_heads(self.heads)

    # ------------------------------------------------------------------ string form

    @classmethod
    def parse(cls, s: Union[str, "Genotype"]) -> "Genotype":
        """``"K1,S1,E1[,L1]|...|K4,S4,E4[,L4]|H[,hidden]"`` -> Genotype (a Genotype passes through).
        Checks the structure only; call ``validate()`` for search-space membership."""
        if isinstance(s, Genotype):
            return s
        if not isinstance(s, str):
            raise TypeError(f"genotype must be a str or Genotype, got {type(s).__name__}")
        parts = s.strip().split("|")
        if len(parts) != 5:
            raise ValueError(f"genotype must have 5 '|'-separated fields (4 stages and H), got {len(parts)} in {s!r}")
        stages = []
        for i, part in enumerate(parts[:4]):
            vals = _parse_ints(part, f"stage {i + 1}")
            if len(vals) not in (3, 4):
                raise ValueError(f"stage {i + 1}: expected 3 or 4 comma-separated ints, got {part!r}")
            stages.append(vals + [1] * (4 - len(vals)))
        last = _parse_ints(parts[4], "H field")
        if len(last) not in (1, 2):
            raise ValueError(f"H field: expected H or H,hidden, got {parts[4]!r}")
        k, sp, e, d = (tuple(col) for col in zip(*stages))
        return cls(k, sp, e, last[0], d, last[1] if len(last) == 2 else DEFAULT_HIDDEN)

    def to_string(self) -> str:
        """The canonical string (see the module docstring)."""
        with_depth = self.depths != DEFAULT_DEPTHS
        stages = []
        for i in range(4):
            vals = [self.kernels[i], self.splits[i], self.expansions[i]] + ([self.depths[i]] if with_depth else [])
            stages.append(",".join(map(str, vals)))
        tail = str(self.heads) + (f",{self.hidden}" if self.hidden != DEFAULT_HIDDEN else "")
        return "|".join(stages + [tail])

    def __str__(self) -> str:
        return self.to_string()

    # ------------------------------------------------------------------ search space

    def to_choices(self) -> dict[str, int]:
        """The value of every SPACE dimension, in DIMENSIONS order."""
        out = {}
        for i in range(4):
            out[f"K{i + 1}"] = self.kernels[i]
            out[f"S{i + 1}"] = self.splits[i]
            out[f"E{i + 1}"] = self.expansions[i]
        out["H"] = self.heads
        return {name: out[name] for name in DIMENSIONS}

    def to_indices(self) -> tuple[int, ...]:
        """The index of each choice in SPACE, in DIMENSIONS order (ValueError outside SPACE)."""
        self.validate()
        return tuple(SPACE[n].index(v) for n, v in self.to_choices().items())

    @classmethod
    def from_choices(cls, choices: Choices, *, depths: Sequence[int] = DEFAULT_DEPTHS,
                     hidden: int = DEFAULT_HIDDEN) -> "Genotype":
        """A dict {dimension: value} (all of DIMENSIONS) or a sequence of indices into SPACE, one
        per dimension in DIMENSIONS order -> Genotype."""
        if isinstance(choices, Mapping):
            missing = [n for n in DIMENSIONS if n not in choices]
            extra = [n for n in choices if n not in SPACE]
            if missing or extra:
                raise ValueError(f"choices must name exactly {DIMENSIONS}; missing {missing}, unknown {extra}")
            values = dict(choices)
        elif isinstance(choices, Sequence) and not isinstance(choices, (str, bytes)):
            if len(choices) != len(DIMENSIONS):
                raise ValueError(f"choices must hold {len(DIMENSIONS)} indices (one per dimension), got {len(choices)}")
            values = {}
            for name, idx in zip(DIMENSIONS, choices):
                if not _is_int(idx) or not 0 <= idx < len(SPACE[name]):
                    raise ValueError(f"index for {name} must be an int in [0, {len(SPACE[name])}), got {idx!r}")
                values[name] = SPACE[name][idx]
        else:
            raise TypeError(f"choices must be a dict or a sequence of indices, got {type(choices).__name__}")
        col = lambda letter: tuple(values[f"{letter}{i + 1}"] for i in range(4))  # noqa: E731
        return cls(col("K"), col("S"), col("E"), values["H"], tuple(depths), hidden)

    def validate(self, in_space: bool = True) -> "Genotype":
        """Raise ValueError naming the first choice outside SPACE (the structure was checked at
        construction). Returns self."""
        if in_space:
            for name, v in self.to_choices().items():
                if v not in SPACE[name]:
                    raise ValueError(f"{name} must be one of {SPACE[name]}, got {v}")
        return self

    def with_(self, **changes) -> "Genotype":
        """A copy with fields replaced (e.g. ``depths=...``, ``hidden=...``), re-checked."""
        return dataclasses.replace(self, **changes)
