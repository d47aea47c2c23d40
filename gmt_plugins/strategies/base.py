"""What a strategy is: something that turns this step's gradients into a mask plan."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gmt_plugins.config import GMTConfig
from gmt_plugins.distributed import ShardInfo
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.keys import ShiftedKeys
from gmt_plugins.engine.types import Cut, KeySource, Ranking
from gmt_plugins.layout import flat_like


@dataclass
class GradEntry:
    """One selected parameter at one step: ``flat`` is a flat, contiguous view of its gradient.

    Under FSDP2 ``param`` and ``flat`` are the local shards (plain tensors) and ``shard`` says where
    they sit in the full tensor; ``shard`` is ``None`` for whole gradients (one process, DDP).
    """

    index: int
    name: str
    param: torch.nn.Parameter
    flat: torch.Tensor
    shard: ShardInfo | None = None
    _nonfinite: int | None = field(default=None, init=False, repr=False, compare=False)

    def nonfinite_count(self, chunk_numel: int) -> int:
        """NaN/inf entries of ``flat``, counted once per step: the masker's skipped-step check counts
        them for stateful strategies, and a plan that needs the count (``mask_plan``) reuses it rather
        than reading the gradient again. Gradients are not changed between the two (strategies plan,
        the engine masks afterwards)."""
        if self._nonfinite is None:
            self._nonfinite = dispatch.count_nonfinite(self.flat, chunk_numel)
        return self._nonfinite

    def known_nonfinite(self) -> int | None:
        """The count :meth:`nonfinite_count` already took this step, or ``None``."""
        return self._nonfinite

    @property
    def offset(self) -> int:
        """Flat position of ``flat[0]`` in the full tensor (0 unless sharded)."""
        return 0 if self.shard is None else self.shard.offset

    def param_flat(self) -> torch.Tensor:
        """The parameter's entries (detached) in the order of ``flat``: the gradient's memory order,
        which for a ``channels_last`` tensor is not ``reshape(-1)``'s logical order."""
        param = self.param.detach()
        grad = getattr(self.param, "grad", None)
        if self.shard is None and isinstance(grad, torch.Tensor) and grad.shape == param.shape and param.dim() > 1:
            return flat_like(param, grad)
        return param.reshape(-1)


def count_nonfinite(flat: torch.Tensor, chunk_numel: int) -> int:
    """NaN/inf entries of ``flat`` (see :func:`gmt_plugins.engine.dispatch.count_nonfinite`)."""
    return dispatch.count_nonfinite(flat, chunk_numel)


@dataclass
class TensorPlan:
    """How one tensor is masked: the keys come from ``source`` (as tensor ``local_index``).

    ``ranking``, when the engine ranked the cut, tells the apply which backend made it (and carries
    that backend's state); a cut a strategy sets itself (``Cut(1)`` for stored masks) has none.
    """

    source: KeySource
    local_index: int
    cut: Cut
    nonfinite: int = 0
    ranking: Ranking | None = None


class RankedTensorPlan(TensorPlan):
    """The plan of member ``local_index`` of a group the engine ranks: ``ranking`` is the group's
    :class:`~gmt_plugins.engine.types.Ranking` or a callable that ranks the group when first read
    (see :func:`gmt_plugins.engine.dispatch.rank_step`); cut and count are read from it."""

    def __init__(self, source: KeySource, local_index: int, ranking: Ranking | Callable[[], Ranking]) -> None:
        self.source, self.local_index = source, local_index
        self._ranking = ranking

    @property  # type: ignore[override]
    def ranking(self) -> Ranking:
        if callable(self._ranking):
            self._ranking = self._ranking()
        return self._ranking

    @property  # type: ignore[override]
    def cut(self) -> Cut:
        return self.ranking.cut

    @property  # type: ignore[override]
    def nonfinite(self) -> int:
        return self.ranking.nonfinite[self.local_index]


class DeferredTensorPlan(TensorPlan):
    """A :class:`TensorPlan` decided when the masker first reads it: ``resolve()`` returns the plan.

    A strategy whose :attr:`MaskStrategy.deferrable` the masker set plans the tensor scope this way:
    the masker masks tensor by tensor, so each tensor is ranked right before it is masked, while its
    gradient is still in cache from the ranking read (most of a model's tensors are a few MB), rather
    than all tensors ranked and then all masked, each gradient read twice from memory. The result is
    the same; only the order of the work moves. ``resolve`` may read only its own tensor's gradient
    (the tensors before it are masked by then).
    """

    def __init__(self, resolve: Callable[[], TensorPlan]) -> None:
        self._resolve: Callable[[], TensorPlan] | None = resolve
        self._plan: TensorPlan | None = None

    def _get(self) -> TensorPlan:
        if self._plan is None:
            self._plan = self._resolve()
            self._resolve = None
        return self._plan

    @property  # type: ignore[override]
    def source(self) -> KeySource:
        return self._get().source

    @property  # type: ignore[override]
    def local_index(self) -> int:
        return self._get().local_index

    @property  # type: ignore[override]
    def cut(self) -> Cut:
        return self._get().cut

    @property  # type: ignore[override]
    def nonfinite(self) -> int:
        return self._get().nonfinite

    @property  # type: ignore[override]
    def ranking(self) -> Ranking | None:
        return self._get().ranking


@dataclass
class MaskPlan:
    """One :class:`TensorPlan` per entry, in entry order.

    With ``shared_ties`` the ``ties`` of the first plan is one budget spent over the tensors in
    order (the global scope), otherwise each plan has its own.
    """

    tensors: list[TensorPlan]
    shared_ties: bool = False

    def threshold_values(self) -> list[float | None]:
        return [
            None if p.cut.threshold is None else p.source.key_to_value(p.local_index, p.cut.threshold)
            for p in self.tensors
        ]


class MaskStrategy(ABC):
    """Base class of every strategy; register subclasses with ``register.add`` in
    ``gmt_register_strategies``.

    A strategy may keep state across steps; it must then override :meth:`state_dict` and
    :meth:`load_state_dict` (tensors allowed: they are saved with safetensors).
    """

    name: ClassVar[str]
    options_class: ClassVar[type | None] = None
    """A dataclass of this strategy's options (read from ``config.strategy_options``), or ``None``."""
    supports_sharded_gradients: ClassVar[bool] = False
    """Whether :meth:`plan` is exact on FSDP2 shards: the masker then makes ``rank`` reduce its
    histograms over the shards. Only strategies whose decision is elementwise keys ranked by the
    engine (``KeyedStrategy`` with local keys) qualify; the masker refuses the others when
    gradients are sharded rather than let each shard decide on its own."""
    freezes_before_forward: ClassVar[bool] = False
    """Whether :meth:`frozen_before_forward` may return tensors to freeze (training setups that
    cannot freeze parameters, such as DDP without ``find_unused_parameters``, are then refused)."""
    supported_ratio_of: ClassVar[tuple[str, ...]] = ("all",)
    """The values of ``GMTConfig.ratio_of`` this strategy implements; another is refused when it is built."""
    deferrable: bool = False
    """Set by :class:`~gmt_plugins.masker.GradientMasker` before each :meth:`plan`: True when it will not
    put the strategy's state back after this plan (the strategy keeps none, or the step's gradients are
    finite) and the gradients are whole (no collective in the ranking), so the plan may return
    :class:`DeferredTensorPlan` entries that rank each tensor when the masker reaches it. False
    outside the masker."""
    ignored_settings: ClassVar[tuple[str, ...]] = ()
    """``GMTConfig`` fields this strategy does not use; a value given for one of them explicitly is
    warned about once (see :meth:`GMTConfig.given`)."""

    def __init__(self, config: GMTConfig) -> None:
        self.config = config
        if self.options_class is None:
            if config.strategy_options:
                raise ValueError(f"strategy {self.name!r} takes no strategy_options, got {sorted(config.strategy_options)}")
            self.options = None
        else:
            self.options = parse_options(self.name, self.options_class, config.strategy_options)
        warn_ignored_settings(self.name, self.ignored_settings, config)
        check_ratio_of(type(self), config)

    @abstractmethod
    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        """Decide what to mask at optimizer step ``step`` (0-based) from the accumulated gradients."""

    def on_step_boundary(self, params: Sequence[tuple[str, torch.nn.Parameter]], *, step: int) -> None:
        """Act on the parameters themselves at optimizer step ``step`` (0-based); does nothing by default.

        :class:`~gmt_plugins.masker.GradientMasker` calls it once per optimizer step from ``apply()``:
        after the backward pass and before this step's :meth:`plan` and ``optimizer.step()``, under
        ``torch.no_grad()``, with every selected ``(name, parameter)`` pair (those without a gradient
        too). A strategy may change parameter *values* here, in place (``lt_sft`` resets the weights
        to their pretrained values at its phase boundary, ``spiel`` resets the entries it drops);
        gradients are left to :meth:`plan`. Under FSDP2 the parameters are DTensor shards, so a
        strategy that overrides this keeps ``supports_sharded_gradients`` False unless it handles them.
        """

    def frozen_before_forward(self, names: Sequence[str], *, step: int) -> set[str]:
        """Names (among ``names``, the selected parameters) to freeze for the whole of optimizer step
        ``step``, decided before its first forward pass.

        Called by :meth:`GradientMasker.begin_step` (``GMTCallback`` calls it in ``on_step_begin``).
        The masker sets ``requires_grad=False`` and ``.grad=None`` on them, so backward computes no
        weight gradient for them and the optimizer skips them; :meth:`plan` then sees only the
        other gradients. The default freezes nothing.
        """
        return set()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} keeps no state, but got state keys {sorted(state)}")


class KeyedStrategy(MaskStrategy):
    """A strategy that ranks entries by a key and masks exactly ``floor(mask_ratio * n)`` of them,
    per tensor or globally according to ``config.scope``."""

    positional_keys: ClassVar[bool] = False
    """Whether ``key_source``'s keys depend on an entry's flat position (``start``) in the *full*
    tensor (position hashes such as ``RandomKeys``) rather than index the entry's own local data:
    on a shard the position is then shifted by the shard's offset."""

    @abstractmethod
    def key_source(self, entries: Sequence[GradEntry], *, step: int) -> KeySource:
        """Keys for ``entries`` (one entry in the tensor scope, all of them in the global scope)."""

    def plan(self, entries: Sequence[GradEntry], *, step: int) -> MaskPlan:
        warm = self.__dict__.setdefault("_warm", {})  # boundary bins of the last step: a speed hint only
        groups = [list(entries)] if self.config.scope == "global" else [[e] for e in entries]
        sources = [self._key_source(group, step) for group in groups]
        ks = None
        if self.config.ratio_of == "nonzero":
            from gmt_plugins.nonzero_ratio import masked_count

            ks = [masked_count(group, self.config.mask_ratio, self.config.chunk_numel) for group in groups]
        # each tensor ranked when the masker reaches it, where it allows (see MaskStrategy.deferrable:
        # never on a sharded step, whose ranking is a collective every rank makes in the same order)
        rankings = dispatch.rank_step(
            [(source, [(i, e.flat) for i, e in enumerate(group)]) for source, group in zip(sources, groups)],
            None if ks is not None else self.config.mask_ratio, ks=ks, chunk_numel=self.config.chunk_numel,
            warm=warm, names=[group[0].name if len(group) == 1 else "" for group in groups],
            defer=self.deferrable and self.config.scope != "global",
        )
        plans: list[TensorPlan] = []
        for source, group, ranking in zip(sources, groups, rankings):
            plans += [RankedTensorPlan(source, i, ranking) for i in range(len(group))]
        return MaskPlan(plans, shared_ties=self.config.scope == "global")

    def _key_source(self, entries: Sequence[GradEntry], step: int) -> KeySource:
        source = self.key_source(entries, step=step)
        if self.positional_keys and any(e.offset for e in entries):
            source = ShiftedKeys(source, [e.offset for e in entries])
        return source


def check_ratio_of(strategy: type[MaskStrategy], config: GMTConfig) -> None:
    """A ``ValueError`` naming ``ratio_of`` when ``strategy`` does not implement ``config.ratio_of``."""
    if config.ratio_of not in strategy.supported_ratio_of:
        raise ValueError(
            f"ratio_of={config.ratio_of!r} has no meaning for strategy {strategy.name!r} (it takes ratio_of in "
            f"{strategy.supported_ratio_of}); ratio_of='nonzero' counts the smallest nonzero gradient magnitudes, "
            "which strategy 'gmt' ranks"
        )


_warned: set[tuple[str, str]] = set()


def warn_ignored_settings(strategy: str, settings: Sequence[str], config: GMTConfig) -> None:
    """Warn once per process and (strategy, field) when ``config`` gives a value for a field the
    strategy does not use: an explicit value is never ignored silently."""
    import warnings

    from gmt_plugins._checks import user_stacklevel

    for setting in settings:
        if config.given(setting) and (strategy, setting) not in _warned:
            _warned.add((strategy, setting))
            warnings.warn(
                f"strategy {strategy!r} does not use {setting}={getattr(config, setting)!r}; the value is ignored",
                UserWarning,
                stacklevel=user_stacklevel(),  # the user's line that built the callback or masker
            )


def parse_options(strategy: str, options_cls: type, options: dict[str, Any]) -> Any:
    """Build a strategy's options dataclass from ``config.strategy_options``.

    Unknown keys are a ``ValueError`` that lists the known ones; the dataclass's own
    ``__post_init__`` validates values.
    """
    import dataclasses

    known = {f.name for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"strategy_options {unknown} are not options of strategy {strategy!r}; it takes {sorted(known)}")
    return options_cls(**options)
