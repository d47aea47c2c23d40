from __future__ import annotations

import pytest
import torch

from gmt_plugins.state_io import load_state, save_state


def test_round_trip_tensors_and_json(tmp_path):
    state = {"step": 3, "strategy": "x", "strategy_state": {"mask": {"a.weight": torch.tensor([True, False])}, "ema": [torch.ones(2, 3), 1.5], "none": None}}
    save_state(state, str(tmp_path))
    loaded = load_state(str(tmp_path))
    assert loaded["step"] == 3 and loaded["strategy_state"]["none"] is None
    assert torch.equal(loaded["strategy_state"]["mask"]["a.weight"], torch.tensor([True, False]))
    assert torch.equal(loaded["strategy_state"]["ema"][0], torch.ones(2, 3))
    assert loaded["strategy_state"]["ema"][1] == 1.5


def test_refuses_unserialisable(tmp_path):
    with pytest.raises(TypeError, match="object"):
        save_state({"x": object()}, str(tmp_path))


def test_per_rank_stems_do_not_collide(tmp_path):
    from gmt_plugins.integrations.transformers import has_per_rank_state

    save_state({"step": 1, "ema": torch.zeros(2)}, str(tmp_path), stem="gmt_state.rank0")
    save_state({"step": 1, "ema": torch.ones(2)}, str(tmp_path), stem="gmt_state.rank1")
    assert has_per_rank_state([str(tmp_path)])
    assert torch.equal(load_state(str(tmp_path), stem="gmt_state.rank1")["ema"], torch.ones(2))
    assert torch.equal(load_state(str(tmp_path), stem="gmt_state.rank0")["ema"], torch.zeros(2))
    assert not has_per_rank_state([str(tmp_path / "nothing")])
