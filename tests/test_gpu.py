"""CUDA paths: the engine against the reference twin, every strategy, an SFTTrainer bf16 run and
QLoRA 4-bit with paged_adamw_8bit in strict mode.

Every test here is marked ``gpu`` and skips, saying why, when no CUDA device is present (CI and the
development machines have none). ``scripts/gpu_check.sh`` runs them with the GPU benchmarks.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gmt_plugins import GMTConfig, GradientMasker
from gmt_plugins.plugins import get_plugin_manager, strategy_registry
from reference import reference_apply, reference_masks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

SHAPES = [(300, 70), (17,), (1, 1), (40, 70, 2), (0,), (2500,)]


def cuda_params(dtype: torch.dtype, kind: str, seed: int = 0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(SHAPES):
        if kind == "ties":
            g = torch.randint(-3, 4, shape, generator=gen).float() * 0.5
        else:
            g = torch.randn(shape, generator=gen) * 10.0 ** (i % 3 - 1)
            if g.numel() > 10:
                g.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, 0.0])
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device="cuda"))
        p.grad = g.to(dtype).cuda()
        params.append((f"layer{i}.weight", p))
    return params


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("kind", ["normal", "ties"])
@pytest.mark.parametrize("ratio", [1e-3, 0.3, 0.99])
def test_engine_on_cuda_matches_reference(dtype, scope, kind, ratio):
    params = cuda_params(dtype, kind)
    before = [p.grad.cpu() for _, p in params]
    stats = GradientMasker(params, GMTConfig(mask_ratio=ratio, scope=scope, chunk_numel=1024)).apply()
    masks = reference_masks(before, ratio, scope)
    for (name, p), want, mask, t in zip(params, reference_apply(before, masks), masks, stats.tensors):
        got = p.grad.cpu()
        assert torch.equal(got.view(torch.int16 if dtype != torch.float32 else torch.int32),
                           want.view(torch.int16 if dtype != torch.float32 else torch.int32)), name
        assert t.masked == int(mask.sum())


def strategy_names() -> list[str]:
    return sorted(strategy_registry(get_plugin_manager()).names())


@pytest.mark.parametrize("strategy", strategy_names())
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_every_strategy_runs_on_cuda_like_on_cpu(strategy, scope):
    """Same gradients on both devices: the same number of entries masked at every step (and, for
    strategies whose keys are exact on both devices, the same gradients)."""
    from tiny import tiny_llama

    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = tiny_llama().to(device)
        masker = GradientMasker(model, GMTConfig(mask_ratio=0.3, scope=scope, strategy=strategy))
        gen = torch.Generator().manual_seed(1)
        steps = []
        for _ in range(3):
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
            stats = masker.apply()
            steps.append((stats.masked, [p.grad.detach().cpu().clone() for p in model.parameters()]))
        results[device] = steps
    for (masked_cpu, grads_cpu), (masked_cuda, grads_cuda) in zip(results["cpu"], results["cuda"]):
        assert masked_cpu == masked_cuda
        if strategy in ("gmt", "random"):
            assert all(torch.equal(a, b) for a, b in zip(grads_cpu, grads_cuda))


@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_at_most_one_host_sync_per_step(scope, dtype):
    """gmt on CUDA takes gmt_plugins.engine.cuda: one readback per apply(), whatever the tensor count."""
    params = cuda_params(dtype, "normal")
    masker = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope))
    masker.apply()  # warm-up
    for _, p in params:
        p.grad.normal_()
    before = [p.grad.clone() for _, p in params]
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stats = masker.apply()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, f"{len(syncs)} host synchronisations in one step: {[str(w.message) for w in syncs]}"
    masks = reference_masks([g.cpu() for g in before], 0.3, scope)
    assert [t.masked for t in stats.tensors] == [int(m.sum()) for m in masks]
    for (name, p), want in zip(params, reference_apply([g.cpu() for g in before], masks)):
        assert torch.equal(p.grad.cpu(), want), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("scope", ["tensor", "global"])
@pytest.mark.parametrize("kind", ["normal", "ties"])
def test_device_path_on_cuda_matches_host_path(dtype, scope, kind, monkeypatch):
    """Small chunks and groups (carries across chunks and groups on the GPU): the same gradients and
    the same statistics as the reference passes (gmt_plugins.engine.reference) on the same CUDA tensors."""
    from gmt_plugins.engine import cuda
    from gmt_plugins.engine import dispatch

    monkeypatch.setattr(cuda, "CHUNK_NUMEL", 1000)
    monkeypatch.setattr(cuda, "GROUP_ROWS", 2)
    results = {}
    for mode in ("auto", "never"):
        monkeypatch.setattr(dispatch, "DEVICE_MODE", mode)
        params = cuda_params(dtype, kind)
        before = [p.grad.cpu() for _, p in params]
        stats = GradientMasker(params, GMTConfig(mask_ratio=0.3, scope=scope, chunk_numel=1024)).apply()
        results[mode] = (stats.tensors, [p.grad.cpu() for _, p in params])
    masks = reference_masks(before, 0.3, scope)
    view = torch.int16 if dtype != torch.float32 else torch.int32
    for got, want in zip(results["auto"][1], reference_apply(before, masks)):
        assert torch.equal(got.view(view), want.view(view))
    assert results["auto"][0] == results["never"][0]


def test_sft_trainer_bf16_with_gmt(tmp_path):
    pytest.importorskip("trl")
    from test_trainer_integration import MaskSpy, attach_recorder, sft_trainer, trainable

    from gmt_plugins import GMTCallback

    callback = GMTCallback(mask_ratio=0.3)
    trainer = sft_trainer(tmp_path, callback, use_cpu=False, bf16=True, max_steps=3)
    recorder = attach_recorder(trainer)
    trainer.callback_handler.callbacks.insert(2, MaskSpy(recorder))
    trainer.train()
    assert len(recorder.steps) == 3
    names = trainable(recorder)
    for step in recorder.steps:
        grads = [step["grads"][n].cpu() for n in names]
        for name, grad, mask in zip(names, grads, reference_masks(grads, 0.3, "tensor")):
            assert torch.equal(step["masked_grads"][name].cpu(), torch.where(mask, torch.zeros_like(grad), grad)), name


def test_qlora_4bit_paged_adamw_8bit_strict(tmp_path):
    bnb = pytest.importorskip("bitsandbytes", reason="QLoRA needs bitsandbytes")
    if not getattr(getattr(bnb, "cextension", None), "COMPILED_WITH_CUDA", True):
        pytest.skip("bitsandbytes has no CUDA library here")
    from peft import prepare_model_for_kbit_training
    from test_trainer_integration import MaskSpy, assert_frozen_never_moved, attach_recorder, lora_config, masked_entries_moved, sft_trainer
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from gmt_plugins import GMTCallback
    from tiny import tiny_llama

    tiny_llama().save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quantization, device_map={"": 0})
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    callback = GMTCallback(mask_ratio=0.3, strict=True)
    trainer = sft_trainer(tmp_path / "out", callback, model=model, peft_config=lora_config(), use_cpu=False, bf16=True,
                          optim="paged_adamw_8bit", learning_rate=1e-2, weight_decay=0.1, max_steps=3)
    recorder = attach_recorder(trainer)
    trainer.callback_handler.callbacks.insert(2, MaskSpy(recorder))
    trainer.train()
    assert all("lora_" in name for name in callback.masker.names)
    assert_frozen_never_moved(recorder)
    assert masked_entries_moved(recorder) == [0, 0, 0]
