"""RandAugment decided once per clip: timm's policy grammar, turned into plain per-clip decisions.

``parse_policy("rand-m7-n4-mstd0.5-inc1")`` reads timm's RandAugment string (the EVL recipe's,
evl-spec §2). ``policy.decide(seed)`` draws one clip's decisions: which ops, in which order, with
which parameters, as a tuple of :class:`AugOp`. The draws are timm's own, in timm's order, from
``random.Random(seed)`` and ``np.random.RandomState(seed)``: ``RandAugment.__call__`` of
``timm.data.auto_augment`` with Python's and NumPy's global generators seeded with ``seed``
picks the same ops with the same parameters (a test runs both). The sampler draws them from a
clip's ``aug_seed`` into its :class:`~pipelines.sampling.ClipSpec`, so every backend, worker and
process applies the same ops to the same clip, and the same ops to every frame of it, as the
reference's video RandAugment does. Executing them is the backends' business
(:mod:`pipelines.augment` on the CPU, :mod:`pipelines.dali` inside DALI).

Magnitudes map to parameters as in timm (``LEVEL_TO_ARG``): the magnitude (noised by ``mstd``,
clamped to ``[0, mmax]``, 10 by default) over 10 scales each op's range. Geometric ops fill with
grey (128, 128, 128) and resample bicubically, as the reference recipe does.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["AugOp", "RandAugmentPolicy", "PolicyError", "parse_policy", "GEOMETRIC", "STATISTICS", "FILL"]

FILL = 128  # grey, on every channel: timm's default fill, which the reference recipe keeps
_LEVEL_DENOM = 10.0
_TRANSLATE_PCT = 0.45  # timm's default range of TranslateXRel / TranslateYRel

# timm's op lists (timm.data.auto_augment._RAND_TRANSFORMS / _RAND_INCREASING_TRANSFORMS).
TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
              "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
INCREASING_TRANSFORMS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                         "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                         "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel",
                         "TranslateYRel")

# What an op does, whatever its magnitude mapping: executors switch on this.
KIND = {name: re.sub(r"Increasing$", "", name) for name in TRANSFORMS + INCREASING_TRANSFORMS}
GEOMETRIC = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
STATISTICS = frozenset({"AutoContrast", "Equalize", "Contrast"})  # need the whole frame's histogram


class PolicyError(ValueError):
    """A RandAugment string this module does not understand."""


class AugOp(NamedTuple):
    """One applied op of a clip: timm's op name, the magnitude drawn, and the op's parameter.

    ``arg`` is what timm passes to the op: degrees (Rotate, counter-clockwise), shear factor,
    translation as a fraction of the width or height, bits kept (Posterize), threshold
    (Solarize), value added (SolarizeAdd), enhancement factor (Color, Contrast, Brightness,
    Sharpness: 1 is no change); None for AutoContrast, Equalize and Invert.
    """

    name: str
    magnitude: float
    arg: float | None

    @property
    def kind(self) -> str:
        return KIND[self.name]


def _negate(rng: random.Random, v: float) -> float:
    return -v if rng.random() > 0.5 else v  # timm's _randomly_negate


def _arg(name: str, level: float, rng: random.Random) -> float | None:
    """timm's LEVEL_TO_ARG for ``name`` at magnitude ``level`` (drawing signs from ``rng``)."""
    kind = KIND[name]
    if kind in ("AutoContrast", "Equalize", "Invert"):
        return None
    if kind == "Rotate":
        return _negate(rng, level / _LEVEL_DENOM * 30.0)
    if kind in ("ShearX", "ShearY"):
        return _negate(rng, level / _LEVEL_DENOM * 0.3)
    if kind in ("TranslateXRel", "TranslateYRel"):
        return _negate(rng, level / _LEVEL_DENOM * _TRANSLATE_PCT)
    if name == "Posterize":
        return int(level / _LEVEL_DENOM * 4)
    if name == "PosterizeIncreasing":
        return 4 - int(level / _LEVEL_DENOM * 4)
    if name == "Solarize":
        return min(256, int(level / _LEVEL_DENOM * 256))
    if name == "SolarizeIncreasing":
        return 256 - min(256, int(level / _LEVEL_DENOM * 256))
    if name == "SolarizeAdd":
        return min(128, int(level / _LEVEL_DENOM * 110))
    if name.endswith("Increasing"):  # Color, Contrast, Brightness, Sharpness
        return max(0.1, 1.0 + _negate(rng, level / _LEVEL_DENOM * 0.9))
    return level / _LEVEL_DENOM * 1.8 + 0.1


@dataclass(frozen=True)
class RandAugmentPolicy:
    """A parsed ``rand-...`` string: ``num_layers`` ops drawn with replacement from ``transforms``,
    each applied with probability ``prob`` at ``magnitude`` (noised by ``magnitude_std``, uniform
    on ``[0, magnitude]`` when infinite, clamped to ``[0, magnitude_max]``)."""

    spec: str
    magnitude: int = 10
    num_layers: int = 2
    prob: float = 0.5
    magnitude_std: float = 0.0
    magnitude_max: float = _LEVEL_DENOM
    increasing: bool = False

    @property
    def transforms(self) -> tuple[str, ...]:
        return INCREASING_TRANSFORMS if self.increasing else TRANSFORMS

    def decide(self, seed: int) -> tuple[AugOp, ...]:
        """The ops applied to one clip, in order; skipped layers are left out."""
        names = self.transforms
        chosen = np.random.RandomState(seed % (1 << 32)).choice(len(names), self.num_layers, replace=True)
        rng = random.Random(seed)
        ops = []
        for i in chosen.tolist():
            if self.prob < 1.0 and rng.random() > self.prob:
                continue
            m = float(self.magnitude)
            if self.magnitude_std == math.inf:
                m = rng.uniform(0, m)
            elif self.magnitude_std > 0:
                m = rng.gauss(m, self.magnitude_std)
            m = max(0.0, min(m, self.magnitude_max))
            ops.append(AugOp(names[i], m, _arg(names[i], m, rng)))
        return tuple(ops)


_SECTION = re.compile(r"^([a-z]+)(\d.*)$")


def parse_policy(spec: str) -> RandAugmentPolicy:
    """timm's RandAugment grammar: ``rand`` then any of ``m{int}`` (magnitude, default 10),
    ``n{int}`` (ops per clip, default 2), ``p{float}`` (probability of each op, default 0.5),
    ``mstd{float}`` (magnitude noise; above 100 uniform), ``mmax{int}`` (magnitude bound, default
    10) and ``inc{0|1}`` (the ops whose strength increases with magnitude), separated by ``-``."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise PolicyError(f"augmentation policy {spec!r}: only timm RandAugment strings ('rand-m7-n4-...') "
                          "are supported")
    fields: dict = {}
    for section in parts[1:]:
        match = _SECTION.match(section)
        key, value = match.groups() if match else (section, "")
        try:
            if key == "m":
                fields["magnitude"] = int(value)
            elif key == "n":
                fields["num_layers"] = int(value)
            elif key == "p":
                fields["prob"] = float(value)
            elif key == "mstd":
                std = float(value)
                fields["magnitude_std"] = math.inf if std > 100 else std
            elif key == "mmax":
                fields["magnitude_max"] = float(int(value))
            elif key == "inc":
                fields["increasing"] = bool(int(value))
            else:
                raise PolicyError(f"augmentation policy {spec!r}: unknown section {section!r} "
                                  "(supported: m, n, p, mstd, mmax, inc)")
        except ValueError as e:
            if isinstance(e, PolicyError):
                raise
            raise PolicyError(f"augmentation policy {spec!r}: bad value in section {section!r}") from None
    policy = RandAugmentPolicy(spec=spec, **fields)
    if policy.num_layers < 0 or not 0.0 <= policy.prob <= 1.0 or policy.magnitude < 0 or policy.magnitude_std < 0:
        raise PolicyError(f"augmentation policy {spec!r}: n, m and mstd must be non-negative and p in [0, 1]")
    return policy
