"""``SparseAdamW``: AdamW whose state covers only the entries a fixed-mask strategy lets move.

Fixed-mask strategies (``sift``, ``lift``, ``spt``, ``id3``) update a small, rarely changing subset
of every tensor. Dense AdamW keeps two full-size moments per tensor although at 1 % density 99 % of
them never matter, and its weight decay and momentum still move the masked entries. As LIFT's own
``SparseAdamW`` does, this optimizer keeps, per tensor, the flat indices of the updatable entries
and the two moments for those entries only, and touches nothing else: masked entries stay
bit-identical without ``strict=True``.

On the updatable entries it is exactly ``torch.optim.AdamW`` (its single-tensor arithmetic, in the
same order) applied to those entries alone; ``tests/test_sparse_adamw.py`` holds the twin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

MaskSource = Callable[[str], "torch.Tensor | bool | None"]
"""Maps a parameter name to its updatable entries now: a bool tensor shaped like the parameter
(sparse update), ``True`` (every entry: plain AdamW with full state), or ``None``/``False``
(no update at this step)."""


class SparseAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with state for the updatable entries only.

    Args:
        named_params (iterable of `(str, Parameter)`, or param groups whose ``params`` are such pairs):
            What to optimize; names are what ``masks`` is asked about (``model.named_parameters()``).
        masks (`Callable[[str], Tensor | bool | None]`):
            The updatable entries of each parameter, asked at every step (see :data:`MaskSource`);
            :func:`strategy_masks` reads them from a ``GradientMasker`` or ``GMTCallback``.
        lr (`float`, *optional*, defaults to `1e-3`): As ``torch.optim.AdamW``.
        betas (`tuple[float, float]`, *optional*, defaults to `(0.9, 0.999)`): As ``torch.optim.AdamW``.
        eps (`float`, *optional*, defaults to `1e-8`): As ``torch.optim.AdamW``.
        weight_decay (`float`, *optional*, defaults to `1e-2`):
            As ``torch.optim.AdamW``; it applies to the updatable entries only.

    When a parameter's updatable set changes (``lift`` refreshes, ``id3`` grows), entries that stay
    keep their moments, new entries start from zero moments, and the parameter's step count (bias
    correction) carries on. A parameter whose ``.grad`` is None is skipped, as by every PyTorch
    optimizer.

    Example:

    ```python
    callback = GMTCallback(strategy="sift", mask_ratio=0.99)
    optimizer = SparseAdamW(model.named_parameters(), masks=strategy_masks(callback), lr=1e-4)
    trainer = Trainer(model=model, args=args, callbacks=[callback], optimizers=(optimizer, None), ...)
    ```
    """

    def __init__(
        self,
        named_params: Iterable[Any],
        masks: MaskSource,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        if not 0.0 <= lr:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if not 0.0 <= eps:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(named_params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        for group in self.param_groups:
            if "param_names" not in group:
                raise ValueError("SparseAdamW needs named parameters (model.named_parameters()) to ask masks about them")
        self.masks = masks
        self._seen: dict[int, tuple[torch.Tensor, int]] = {}
        """Per parameter, the mask object and version whose indices the state holds."""

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for name, param in zip(group["param_names"], group["params"]):
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError(f"SparseAdamW needs dense gradients; {name!r} has a sparse one")
                mask = self.masks(name)
                if mask is None or mask is False:
                    continue
                index = None if mask is True else self._index(param, mask)
                if index is not None and index.numel() == 0:
                    continue
                self._update(param, index, group)
        return loss

    def _index(self, param: torch.nn.Parameter, mask: torch.Tensor) -> torch.Tensor:
        """The flat indices of ``mask``; moves the state when they changed since the last step."""
        seen = self._seen.get(id(param))
        state = self.state[param]
        if seen is not None and seen[0] is mask and seen[1] == mask._version and "index" in state:
            return state["index"]
        if mask.shape != param.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask of shape {tuple(mask.shape)} ({mask.dtype}) for a parameter of shape {tuple(param.shape)}")
        index = mask.reshape(-1).to(param.device).nonzero().squeeze(1)
        old = state.get("index")
        if old is not None and not torch.equal(old, index):
            self._remap(state, old, index)
        state["index"] = index
        self._seen[id(param)] = (mask, mask._version)
        return index

    @staticmethod
    def _remap(state: dict[str, Any], old: torch.Tensor, new: torch.Tensor) -> None:
        """Keep the moments of entries in both index sets (both sorted); new entries start at zero."""
        pos = torch.searchsorted(new, old).clamp_(max=max(new.numel() - 1, 0))
        kept = new[pos] == old if new.numel() else torch.zeros_like(old, dtype=torch.bool)
        for key in ("exp_avg", "exp_avg_sq"):
            moved = state[key].new_zeros(new.numel())
            moved[pos[kept]] = state[key][kept]
            state[key] = moved

    def _update(self, param: torch.nn.Parameter, index: torch.Tensor | None, group: dict[str, Any]) -> None:
        state = self.state[param]
        flat = param.view(-1) if index is None else param.view(-1).index_select(0, index)
        grad = param.grad.reshape(-1) if index is None else param.grad.reshape(-1).index_select(0, index)
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        # torch.optim.AdamW's single-tensor arithmetic, in its order, so the twin test can ask for equality
        state["step"] += 1
        step = state["step"].item()
        if weight_decay != 0:
            flat.mul_(1 - lr * weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(eps)
        flat.addcdiv_(exp_avg, denom, value=-step_size)
        if index is not None:
            param.view(-1).index_copy_(0, index, flat)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._seen.clear()  # indices are checked against the masks again at the next step

    def state_bytes(self) -> int:
        """Bytes held by the optimizer state (moments, indices, step counters)."""
        return sum(t.numel() * t.element_size() for s in self.state.values() for t in s.values() if isinstance(t, torch.Tensor))


def strategy_masks(source: Any) -> MaskSource:
    """The updatable entries of a fixed-mask strategy (``sift``, ``lift``, ``spt``, ``id3``: its public
    ``updatable`` state), for :class:`SparseAdamW`.

    ``source`` is a ``GradientMasker`` or a ``GMTCallback`` (whose masker only exists from train
    begin on, after the Trainer took the optimizer). Parameters the masker did not select are updated
    densely; selected ones not updated until the strategy has chosen their mask (e.g. during
    ``sift``'s warm-up, when it masks everything anyway).
    """

    from gmt_plugins.masker import GradientMasker

    selected: dict[int, frozenset[str]] = {}

    def lookup(name: str) -> torch.Tensor | bool | None:
        masker = source if isinstance(source, GradientMasker) else getattr(source, "masker", None)
        if masker is None:
            return None
        names = selected.get(id(masker))
        if names is None:
            names = selected[id(masker)] = frozenset(masker.names)
        if name not in names:
            return True
        if not hasattr(masker.strategy, "updatable"):
            raise ValueError(
                f"strategy {masker.strategy.name!r} keeps no fixed mask; SparseAdamW works with sift, lift, spt and id3"
            )
        updatable = masker.strategy.updatable
        return None if updatable is None else updatable.get(name)

    return lookup
