"""Wrappers are removed by type (never by attribute name), and channels_last gradients are masked exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gmt_plugins import GradientMasker
from gmt_plugins.masker import unwrap_model as unwrap_from_masker
from gmt_plugins.wrappers import unwrap_model
from reference import reference_masks


class WithModuleChild(nn.Module):
    """An ordinary model whose first submodule happens to be called ``module``."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


def bare_instance(cls: type, inner: nn.Module, attribute: str = "module") -> nn.Module:
    """An instance of a wrapper class without its process-group setup: enough to test recognition by type."""
    wrapper = cls.__new__(cls)
    nn.Module.__init__(wrapper)
    setattr(wrapper, attribute, inner)
    return wrapper


def test_submodule_called_module_is_not_a_wrapper():
    model = WithModuleChild()
    assert unwrap_model(model) is model
    masker = GradientMasker(model, mask_ratio=0.5)
    assert masker.names == ["module.weight", "module.bias", "head.weight", "head.bias"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    stats = masker.apply()
    assert {t.name for t in stats.tensors} == set(masker.names)
    assert all((p.grad == 0).sum() == p.numel() // 2 for p in model.parameters())  # head masked too


def test_data_parallel_and_torch_compile_are_removed():
    inner = WithModuleChild()
    assert unwrap_model(nn.DataParallel(inner)) is inner
    assert unwrap_model(torch.compile(inner)) is inner  # OptimizedModule; nothing compiles until it is called
    assert unwrap_model(torch.compile(nn.DataParallel(inner))) is inner
    assert unwrap_from_masker is unwrap_model


def test_ddp_and_fsdp1_are_removed_by_type():
    from torch.distributed.fsdp import FullyShardedDataParallel

    inner = WithModuleChild()
    assert unwrap_model(bare_instance(nn.parallel.DistributedDataParallel, inner)) is inner
    assert unwrap_model(bare_instance(FullyShardedDataParallel, inner, "_fsdp_wrapped_module")) is inner


def test_deepspeed_engine_is_removed_by_type():
    engine_module = pytest.importorskip("deepspeed.runtime.engine", reason="deepspeed is optional")
    inner = WithModuleChild()
    assert unwrap_model(bare_instance(engine_module.DeepSpeedEngine, inner)) is inner

    class Subclassed(engine_module.DeepSpeedEngine):  # PipelineEngine and friends subclass it
        pass

    assert unwrap_model(bare_instance(Subclassed, inner)) is inner


def test_a_look_alike_is_not_unwrapped():
    class DeepSpeedEngine(nn.Module):  # same name, another module: an ordinary user class
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.extra = nn.Linear(2, 2)

    model = DeepSpeedEngine()
    assert unwrap_model(model) is model


# --- channels_last -------------------------------------------------------------------------


def channels_last_grads(levels: int | None = None) -> list[tuple[nn.Conv2d, torch.Tensor]]:
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last), nn.Conv2d(4, 2, 1).to(memory_format=torch.channels_last)]
    for conv in convs:
        grad = torch.randn(conv.weight.shape)
        if levels is not None:  # heavy ties: which tied entries are masked depends on the order
            grad = (grad * levels).round() / levels
        conv.weight.grad = grad.contiguous(memory_format=torch.channels_last)
        conv.bias.grad = torch.randn(conv.bias.shape)
    return convs


def memory_order(t: torch.Tensor) -> torch.Tensor:
    """The entries of a channels_last 4-D tensor in memory order (NHWC), as a 1-D copy."""
    return t.permute(0, 2, 3, 1).reshape(-1) if t.dim() == 4 else t.reshape(-1)


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("levels", [None, 2])
def test_channels_last_masks_equal_the_reference_in_memory_order(scope, levels):
    convs = channels_last_grads(levels)
    params = [p for conv in convs for p in conv.parameters()]
    assert params[0].grad.is_contiguous(memory_format=torch.channels_last) and not params[0].grad.is_contiguous()
    before = [memory_order(p.grad).clone() for p in params]
    GradientMasker([(f"p{i}", p) for i, p in enumerate(params)], mask_ratio=0.4, scope=scope).apply()
    expected = reference_masks(before, 0.4, scope)  # ties are spent in memory order
    for p, grad, mask in zip(params, before, expected):
        assert p.grad.is_contiguous(memory_format=torch.channels_last) or p.dim() == 1  # masked in place
        assert torch.equal(memory_order(p.grad), torch.where(mask, torch.zeros_like(grad), grad))


def test_channels_last_strict_holds_masked_weights():
    convs = channels_last_grads()
    params = [p for conv in convs for p in conv.parameters()]
    masker = GradientMasker([(f"p{i}", p) for i, p in enumerate(params)], mask_ratio=0.5, strict=True)
    before = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    masker.apply()
    masked = [p.grad == 0 for p in params]
    optimizer.step()
    assert masker.restore_masked() == sum(int(m.sum()) for m in masked)
    for p, old, m in zip(params, before, masked):
        assert torch.equal(p.detach()[m], old[m]) and not torch.equal(p.detach()[~m], old[~m])


def test_overlapping_gradient_is_refused_naming_the_parameter():
    p = nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.ones(4).expand(3, 4)  # stride 0: not one dense block
    with pytest.raises(ValueError, match="gradient of 'w'.*dense block"):
        GradientMasker([("w", p)], mask_ratio=0.5).apply()


@pytest.mark.parametrize("strategy", ["id3", "sara"])
def test_strategies_that_read_the_weights_pair_them_with_the_gradient_entry_by_entry(strategy):
    """id3 and sara rank by the weights beside the gradient: on channels_last tensors the weights must
    be read in the gradient's memory order, so the masks equal those of a contiguous copy of the same
    weights and gradients (no ties: continuous random values)."""
    def run(channels_last: bool) -> list[torch.Tensor]:
        convs = channels_last_grads()
        params = [p for conv in convs for p in conv.parameters()]
        if not channels_last:
            for p in params:
                p.data, p.grad = p.data.contiguous(), p.grad.contiguous()
        with torch.no_grad():
            for p in params:  # weights far apart in magnitude, so the ranking depends on them
                p.mul_(torch.logspace(-3, 3, p.numel()).view(p.shape))
        options = {"steps_to_budget": 1} if strategy == "id3" else {}  # id3: the whole budget in one growth step
        masker = GradientMasker(
            [(f"p{i}", p) for i, p in enumerate(params)], mask_ratio=0.5, strategy=strategy, strategy_options=options
        )
        masker.apply()
        return [p.grad == 0 for p in params]

    reference, tested = run(False), run(True)
    assert any(m.any() for m in reference)
    for want, got in zip(reference, tested):
        assert torch.equal(got, want)
