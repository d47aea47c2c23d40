"""Flat views of tensors whatever their memory layout (``torch.channels_last`` included)."""

from __future__ import annotations

import torch


def flat_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """A 1-D view of all of ``tensor``'s entries **in memory order**, or ``None`` if they are not one dense block.

    A contiguous tensor gives ``tensor.view(-1)``. A permuted-dense one (``channels_last``, a transpose) is
    permuted to descending strides first, so the view still aliases the tensor: writing into it writes into
    the tensor. Masks are elementwise, so only the order in which ties at the threshold are spent depends
    on this (memory order: NHWC for ``channels_last``).
    """
    if tensor.is_contiguous():
        return tensor.view(-1)
    order = sorted(range(tensor.dim()), key=lambda d: (-tensor.stride(d), d))
    permuted = tensor.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else None


def same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether :func:`flat_view` lists ``a`` and ``b`` in the same entry order (strides of size-1 dims do not count)."""
    return a.shape == b.shape and all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def flat_like(tensor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """The entries of ``tensor`` (shaped like ``reference``) in the order :func:`flat_view` lists
    ``reference``'s: a view when the two are laid out alike, else a copy. A strategy that reads a
    parameter beside its gradient's flat view pairs entries with this, not ``reshape(-1)``, which
    lists a ``channels_last`` tensor in logical order."""
    if same_layout(tensor, reference):
        view = flat_view(tensor)
        if view is not None:
            return view
    order = sorted(range(reference.dim()), key=lambda d: (-reference.stride(d), d))
    return tensor.permute(order).reshape(-1)
