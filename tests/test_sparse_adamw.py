"""SparseAdamW against its twin, dense ``torch.optim.AdamW``, on the updatable entries; and with
fixed-mask strategies in plain loops and the Trainer."""

from __future__ import annotations

import pytest
import torch

from gmt_plugins import GradientMasker
from gmt_plugins.sparse_adamw import SparseAdamW, strategy_masks

SHAPES = {"w": (7, 13), "v": (5,), "m": (3, 4, 6)}
HYPER = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8)


def params(seed: int = 0) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.nn.Parameter(torch.randn(s, generator=gen)) for n, s in SHAPES.items()}


def random_masks(density: float, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=gen) < density for n, s in SHAPES.items()}


def twin_run(masks_at, steps: int, weight_decay: float):
    """The same gradients through SparseAdamW and through dense AdamW fed the masked gradients."""
    sparse_p, dense_p = params(), params()
    sparse = SparseAdamW(sparse_p.items(), masks=lambda n: masks_at["now"][n], weight_decay=weight_decay, **HYPER)
    dense = torch.optim.AdamW(dense_p.values(), weight_decay=weight_decay, foreach=False, **HYPER)
    gen = torch.Generator().manual_seed(7)
    for step in range(steps):
        masks_at["step"] = step
        masks_at["now"] = masks_at["schedule"](step)
        before = {n: p.detach().clone() for n, p in sparse_p.items()}
        for n in SHAPES:
            g = torch.randn(SHAPES[n], generator=gen)
            sparse_p[n].grad = g.clone()
            dense_p[n].grad = torch.where(masks_at["now"][n], g, 0.0)
        sparse.step()
        dense.step()
        for n, p in sparse_p.items():
            mask = masks_at["now"][n]
            assert torch.equal(p.detach()[~mask], before[n][~mask]), (step, n)  # masked entries never move
    return sparse_p, dense_p, sparse, dense


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fixed_mask_matches_dense_adamw_bit_for_bit_on_updatable_entries(weight_decay):
    masks = random_masks(0.3)
    schedule = {"schedule": lambda step: masks}
    sparse_p, dense_p, sparse, dense = twin_run(schedule, 6, weight_decay)
    for n in SHAPES:
        m = masks[n]
        assert torch.equal(sparse_p[n].detach()[m], dense_p[n].detach()[m]), n
        state, ref = sparse.state[sparse_p[n]], dense.state[dense_p[n]]
        assert torch.equal(state["exp_avg"], ref["exp_avg"][m]) and torch.equal(state["exp_avg_sq"], ref["exp_avg_sq"][m])
        assert state["index"].numel() == int(m.sum())
    if weight_decay:  # dense AdamW moves the masked entries through weight decay; SparseAdamW does not
        assert not torch.equal(dense_p["w"].detach()[~masks["w"]], params()["w"].detach()[~masks["w"]])


def test_growing_mask_keeps_moments_and_matches_dense_without_weight_decay():
    # id3-style growth: entries added later had zero gradients before, so dense AdamW's moments for
    # them are exactly zero, the moments SparseAdamW starts them with; the step count is shared
    small, large = random_masks(0.2, seed=3), random_masks(0.2, seed=4)
    grown = {n: small[n] | large[n] for n in SHAPES}
    schedule = {"schedule": lambda step: small if step < 3 else grown}
    sparse_p, dense_p, sparse, dense = twin_run(schedule, 6, 0.0)
    for n in SHAPES:
        m = grown[n]
        assert torch.equal(sparse_p[n].detach()[m], dense_p[n].detach()[m]), n
        assert torch.equal(sparse.state[sparse_p[n]]["exp_avg_sq"], dense.state[dense_p[n]]["exp_avg_sq"][m]), n


def test_state_at_one_percent_density_is_under_five_percent_of_dense():
    p = torch.nn.Parameter(torch.randn(256, 512))
    mask = torch.rand(p.shape, generator=torch.Generator().manual_seed(0)) < 0.01
    opt = SparseAdamW([("p", p)], masks=lambda n: mask, **HYPER)
    p.grad = torch.randn(p.shape)
    opt.step()
    dense = 2 * p.numel() * p.element_size()
    assert opt.state_bytes() <= 0.05 * dense


def test_none_skips_true_is_dense_and_state_dict_round_trips():
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    mask = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)) < 0.5
    answers = {"p": None, "q": True}
    opt = SparseAdamW([("p", p), ("q", q)], masks=lambda n: answers[n], **HYPER)
    p.grad, q.grad = torch.ones(4, 4), torch.ones(4)
    p0 = p.detach().clone()
    opt.step()
    assert torch.equal(p, p0) and p not in opt.state and opt.state[q]["exp_avg"].shape == (4,)
    answers["p"] = mask
    opt.step()
    saved = opt.state_dict()
    again = SparseAdamW([("p", p), ("q", q)], masks=lambda n: answers[n], **HYPER)
    again.load_state_dict(saved)
    copies = [x.detach().clone() for x in (p, q)]
    opt.step()
    after = [x.detach().clone() for x in (p, q)]
    with torch.no_grad():
        p.copy_(copies[0]), q.copy_(copies[1])
    again.step()
    assert torch.equal(p, after[0]) and torch.equal(q, after[1])


def test_needs_names_and_a_fixed_mask_strategy():
    with pytest.raises(ValueError, match="named parameters"):
        SparseAdamW([torch.nn.Parameter(torch.ones(2))], masks=lambda n: True)
    p = torch.nn.Parameter(torch.ones(3))
    masker = GradientMasker([("p", p)], strategy="gmt")
    opt = SparseAdamW([("p", p)], masks=strategy_masks(masker))
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="keeps no fixed mask"):
        opt.step()


@pytest.mark.parametrize("strategy,options", [("sift", {"warmup_steps": 2}), ("lift", {"rank": 2, "interval": 2}), ("spt", {}), ("id3", {"steps_to_budget": 2})])
def test_plain_loop_with_fixed_mask_strategies(strategy, options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    masker = GradientMasker(model, strategy=strategy, strategy_options=options, mask_ratio=0.9, chunk_numel=1024)
    opt = SparseAdamW(model.named_parameters(), masks=strategy_masks(masker), lr=1e-2, weight_decay=0.1)
    x = torch.randn(8, 16)
    for _ in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x).square().mean().backward()
        masker.apply()
        opt.step()
        opt.zero_grad()
        updatable = masker.strategy.updatable or {}
        for n, p in model.named_parameters():
            frozen = ~updatable[n] if n in updatable else torch.ones_like(p, dtype=torch.bool)
            assert torch.equal(p.detach()[frozen], before[n][frozen]), n
    moved = sum(int((p.detach() != before[n]).sum()) for n, p in model.named_parameters())
    assert moved > 0
    dense_bytes = sum(2 * p.numel() * 4 for p in model.parameters())
    assert opt.state_bytes() < 0.5 * dense_bytes


def test_trainer_sift_with_sparse_adamw(tmp_path):
    pytest.importorskip("trl")
    from gmt_plugins import GMTCallback
    from test_trainer_integration import sft_trainer
    from tiny import tiny_llama

    model = tiny_llama()
    callback = GMTCallback(strategy="sift", mask_ratio=0.99)
    opt = SparseAdamW(model.named_parameters(), masks=strategy_masks(callback), lr=1e-2, weight_decay=0.1)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = sft_trainer(tmp_path, callback, model=model, optimizers=(opt, None), max_steps=3)
    trainer.train()
    updatable = callback.masker.strategy.updatable
    moved = total = 0
    for n, p in model.named_parameters():
        changed = p.detach() != start[n]
        assert not (changed & ~updatable[n]).any(), n  # nothing outside the mask moved
        moved, total = moved + int(changed.sum()), total + p.numel()
    assert 0 < moved <= 0.011 * total
    assert opt.state_bytes() <= 0.05 * 2 * 4 * total
