"""``GMTConfig``: every knob of gradient masking, validated, and usable with ``HfArgumentParser``."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from gmt_plugins.engine.types import DEFAULT_CHUNK_NUMEL

SCOPES = ("tensor", "global")
RATIO_OF = ("all", "nonzero")
_STRATEGY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


class _DefaultFloat(float):
    """The default of a field, marked so that :meth:`GMTConfig.given` can tell it from a value given
    explicitly (even an equal one). It is an ordinary float otherwise, survives
    ``dataclasses.replace``, ``copy`` and pickling, and argparse hands it back untouched when the
    option is not on the command line."""


class _DefaultStr(str):
    """As :class:`_DefaultFloat`, for string fields; but argparse re-parses string defaults, so
    through ``HfArgumentParser`` an unset ``scope`` comes back as a plain (given) string."""


@dataclass
class GMTConfig:
    """Configuration of gradient masking.

    Field names avoid those of ``TrainingArguments`` (hence ``mask_seed`` rather than ``seed``), so
    ``HfArgumentParser((TrainingArguments, GMTConfig))`` parses both from one command line.
    """

    _argument_group_name: ClassVar[str] = "Gradient-Mask Tuning (GMTConfig)"  # HfArgumentParser's help group

    mask_ratio: float = field(
        default=_DefaultFloat(0.2),
        metadata={"help": "Fraction of the selected gradient entries zeroed at each optimizer step, 0 <= r < 1."},
    )
    scope: Literal["tensor", "global"] = field(
        default=_DefaultStr("tensor"),
        metadata={
            "help": "Where the threshold is taken: 'tensor' masks floor(r * n) entries of every tensor; "
            "'global' masks floor(r * N) entries over all selected tensors with one threshold."
        },
    )
    strategy: str = field(
        default="gmt",
        metadata={
            "help": "Name of a registered mask strategy: 'gmt' (the paper's), 'random', or another one "
            "`gmt-plugins list` shows (built-in or from a plugin)."
        },
    )
    strategy_options: dict | str | None = field(
        default=None,
        metadata={
            "help": "Options of the chosen strategy, as a dict or a JSON object string (e.g. '{\"interval\": 50}'), "
            "checked by the strategy when the config is built: unknown names and bad values are an error. "
            "`gmt-plugins list` shows each strategy's options and defaults."
        },
    )
    mask_seed: int = field(
        default=0,
        metadata={"help": "Seed of randomised strategies; the mask at a step depends only on it and the step."},
    )
    include: list[str] | None = field(
        default=None,
        metadata={"help": "Regular expressions (re.search); only parameters whose name matches one are masked."},
    )
    exclude: list[str] | None = field(
        default=None,
        metadata={"help": "Regular expressions (re.search); parameters whose name matches one are never masked."},
    )
    strict: bool = field(
        default=False,
        metadata={
            "help": "Hold every masked entry bit-identical through the optimizer step (AdamW momentum, weight "
            "decay and 8-bit state would otherwise still move it)."
        },
    )
    log_per_tensor: bool = field(
        default=False,
        metadata={"help": "Also log the masked fraction of every tensor (one log key per tensor)."},
    )
    log_layers: bool = field(
        default=False,
        metadata={
            "help": "Also log, per layer (a parameter name cut after its first number, e.g. 'model.layers.3'), the "
            "masked fraction, the masked-nonzero fraction and the share of the updated entries, with track_coverage "
            "the coverage, churn and mask stability, and with track_energy the energy kept."
        },
    )
    track_coverage: bool = field(
        default=False,
        metadata={
            "help": "Keep 2 bits per entry (34 MB for 134.5M entries) to log coverage (fraction of entries updated at "
            "least once), never-updated entries and churn (fraction whose masked state changed since the last step)."
        },
    )
    track_energy: bool = field(
        default=False,
        metadata={
            "help": "Sum g^2 over each gradient before and after masking, in the pass that masks it (a block is summed "
            "while in cache), to log energy_kept: the share of the squared gradient norm the mask keeps (per layer "
            "with log_layers). Costs time in every mask; tensors a strategy leaves whole are read once for it."
        },
    )
    ratio_of: Literal["all", "nonzero"] = field(
        default="all",
        metadata={
            "help": "What mask_ratio is a fraction of: 'all' finite entries (the paper's percentile of |grad|), or "
            "the 'nonzero' ones: floor(r * nonzero) smallest nonzero entries are masked, and the zero entries too "
            "(they change nothing). Strategy 'gmt' only."
        },
    )
    chunk_numel: int = field(
        default=DEFAULT_CHUNK_NUMEL,
        metadata={"help": "Entries processed at a time; bounds the engine's scratch memory. At least 1024."},
    )

    def __post_init__(self) -> None:
        if isinstance(self.mask_ratio, bool) or not isinstance(self.mask_ratio, (int, float)):
            raise ValueError(f"mask_ratio must be a number in [0, 1), got {self.mask_ratio!r}")
        if not 0.0 <= float(self.mask_ratio) < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio!r}")
        if not isinstance(self.mask_ratio, _DefaultFloat):
            self.mask_ratio = float(self.mask_ratio)
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if not isinstance(self.strategy, str) or not _STRATEGY_NAME.match(self.strategy):
            raise ValueError(
                f"strategy must be the name of a registered strategy (letters, digits, '_', '.', '-'), "
                f"got {self.strategy!r}"
            )
        self.strategy_options = _options(self.strategy_options)
        if isinstance(self.mask_seed, bool) or not isinstance(self.mask_seed, int) or self.mask_seed < 0:
            raise ValueError(f"mask_seed must be a non-negative integer, got {self.mask_seed!r}")
        self.include = _patterns("include", self.include)
        self.exclude = _patterns("exclude", self.exclude)
        for flag in ("log_layers", "track_coverage", "track_energy"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.ratio_of not in RATIO_OF:
            raise ValueError(f"ratio_of must be one of {RATIO_OF}, got {self.ratio_of!r}")
        if isinstance(self.chunk_numel, bool) or not isinstance(self.chunk_numel, int) or self.chunk_numel < 1024:
            raise ValueError(f"chunk_numel must be an integer >= 1024, got {self.chunk_numel!r}")
        _check_against_strategy(self)

    def given(self, name: str) -> bool:
        """Whether field ``name`` holds a value given explicitly rather than its default.

        Only ``mask_ratio`` and ``scope`` are tracked (strategies that ignore them warn about an
        explicit value); the other fields always answer ``True``.
        """
        return not isinstance(getattr(self, name), (_DefaultFloat, _DefaultStr))

    def matches(self, name: str) -> bool:
        """Whether a parameter called ``name`` passes the include/exclude patterns."""
        if self.include is not None and not any(re.search(p, name) for p in self.include):
            return False
        return not (self.exclude and any(re.search(p, name) for p in self.exclude))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_against_strategy(config: GMTConfig) -> None:
    """``strategy_options`` (names and values) and ``ratio_of`` checked by the registered strategy, so a bad
    option fails here rather than when training starts. A name the process-wide registry does not know is
    left to the plugin manager that will build the strategy (``GMTCallback``/``GradientMasker`` check it)."""
    from gmt_plugins.plugins import strategy_registry

    registry = strategy_registry()
    if config.strategy in registry:
        registry.check_config(config)


def _patterns(field_name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    patterns = list(value)
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"{field_name} must be a list of regular expressions, got item {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{field_name} pattern {pattern!r} is not a valid regular expression: {err}") from None
    return patterns


def _options(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"strategy_options must be a JSON object, got {value!r}: {err}") from None
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"strategy_options must be a dict with string keys, got {value!r}")
    return dict(value)


def resolve_config(config: GMTConfig | None, overrides: dict[str, Any]) -> GMTConfig:
    """``config`` with ``overrides`` applied (validated again); values left ``UNSET`` keep ``config``'s,
    unknown names are a ``TypeError``."""
    overrides = {name: value for name, value in overrides.items() if value is not UNSET}
    names = {f.name for f in dataclasses.fields(GMTConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown GMTConfig field(s) {unknown}; the fields are {sorted(names)}")
    if config is None:
        return GMTConfig(**overrides)
    if not isinstance(config, GMTConfig):
        raise TypeError(f"config must be a GMTConfig, got {type(config).__name__}")
    return dataclasses.replace(config, **overrides) if overrides else config


class _Unset:
    """The default of the ``GMTConfig`` keyword arguments of ``GMTCallback`` and ``GradientMasker``:
    the field keeps the value of the ``config`` passed (or ``GMTConfig``'s default)."""

    def __repr__(self) -> str:
        return "<from config>"


UNSET: Any = _Unset()
