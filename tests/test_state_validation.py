"""A damaged or foreign GMT state is refused at resume, with the file and the tensor named.

The checkpoint is written by a real 2-step Trainer run of ``gmt_momentum`` (whose state is one EMA per
parameter); the damage is done to the bytes of ``gmt_state.safetensors`` with its size, header and id kept,
so only the recorded per-tensor hashes or the check of the loaded values can tell.
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

pytest.importorskip("transformers")

from gmt_plugins import GMTCallback  # noqa: E402
from gmt_plugins.state_io import StateFileError, load_state, save_state  # noqa: E402
from tiny_trainer import params, tiny_trainer  # noqa: E402

EMA_OF = "layers.0.weight"


def callback() -> GMTCallback:
    return GMTCallback(mask_ratio=0.3, strategy="gmt_momentum", mask_seed=5)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """``checkpoint-2`` of a 4-step run, the final parameters and the final masker state."""
    folder = tmp_path_factory.mktemp("run")
    cb = callback()
    trainer = tiny_trainer(folder, cb)
    trainer.train()
    return folder / "checkpoint-2", params(trainer)


def copy_of(checkpoint, tmp_path):
    target = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, target)
    return target


def tensor_name_of(checkpoint, parameter: str) -> str:
    """The safetensors name ("0", "1", ...) of the EMA of ``parameter``, read from trainer_state.json."""
    record = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["GMTCallback"]
    skeleton = record["attributes"]["resume_state"]["state"]
    return skeleton["strategy_state"]["ema"][parameter]["__tensor__"]


def write_nan_in_place(path, name: str, count: int) -> None:
    """NaN over the first ``count`` float32 values of tensor ``name``: size, header and id unchanged."""
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_len])
    assert header[name]["dtype"] == "F32"
    start = 8 + header_len + header[name]["data_offsets"][0]
    data[start : start + 4 * count] = struct.pack("<f", float("nan")) * count
    path.write_bytes(bytes(data))


def drop_hashes(checkpoint) -> None:
    """trainer_state.json as a save without recorded hashes would have written it."""
    path = checkpoint / "trainer_state.json"
    state = json.loads(path.read_text())
    del state["stateful_callbacks"]["GMTCallback"]["attributes"]["resume_state"]["tensors"]["sha256"]
    path.write_text(json.dumps(state))


def resume(checkpoint, tmp_path):
    # named in the arguments too: the callback then reads this folder's files, not the original run's
    trainer = tiny_trainer(tmp_path / "resumed", callback(), resume_from_checkpoint=str(checkpoint))
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer


def test_an_intact_checkpoint_resumes_bit_identically(saved, tmp_path):
    checkpoint, expected = saved
    got = params(resume(copy_of(checkpoint, tmp_path), tmp_path))
    assert all(torch.equal(value, got[name]) for name, value in expected.items())


def test_nan_written_over_the_ema_is_refused_by_its_hash(saved, tmp_path):
    checkpoint = copy_of(saved[0], tmp_path)
    name = tensor_name_of(checkpoint, EMA_OF)
    size = (checkpoint / "gmt_state.safetensors").stat().st_size
    write_nan_in_place(checkpoint / "gmt_state.safetensors", name, 5)
    assert (checkpoint / "gmt_state.safetensors").stat().st_size == size
    with pytest.raises(StateFileError) as err:
        resume(checkpoint, tmp_path)
    message = str(err.value)
    assert "gmt_state.safetensors" in message and f"'ema'][{EMA_OF!r}]" in message and "SHA-256" in message


def test_nan_in_a_state_saved_without_hashes_is_refused_by_the_value_check(saved, tmp_path):
    checkpoint = copy_of(saved[0], tmp_path)
    drop_hashes(checkpoint)
    write_nan_in_place(checkpoint / "gmt_state.safetensors", tensor_name_of(checkpoint, EMA_OF), 5)
    with pytest.raises(StateFileError) as err:
        resume(checkpoint, tmp_path)
    message = str(err.value)
    assert "gmt_state.safetensors" in message and EMA_OF in message and "5 NaN/inf" in message


def test_state_io_files_carry_hashes_and_refuse_changed_bytes(tmp_path):
    save_state({"step": 1, "strategy_state": {"ema": {"w": torch.ones(4)}}}, str(tmp_path))
    record = json.loads((tmp_path / "gmt_state.json").read_text())["tensors"]
    assert set(record["sha256"]) == {"0"}
    write_nan_in_place(tmp_path / "gmt_state.safetensors", "0", 1)
    with pytest.raises(StateFileError, match=r"gmt_state\.safetensors: tensor '0' \(\['strategy_state'\]\['ema'\]\['w'\]\)"):
        load_state(str(tmp_path))


PARAMS = [("a.weight", torch.nn.Parameter(torch.zeros(2, 3))), ("b.bias", torch.nn.Parameter(torch.zeros(3)))]


def state_of(ema):
    return {"step": 2, "strategy": "gmt_momentum", "strategy_state": {"ema": ema}}


def check_loaded_state(*args, **kwargs):
    from gmt_plugins.state_check import check_loaded_state as check

    return check(*args, **kwargs)


def test_the_check_accepts_a_matching_state():
    check_loaded_state(state_of({"a.weight": torch.ones(2, 3), "b.bias": torch.ones(3)}), PARAMS, source="f", whole=True)


@pytest.mark.parametrize(
    ("ema", "whole", "match"),
    [
        ({"a.weight": torch.ones(3, 3)}, True, r"f: \['strategy_state'\]\['ema'\]\['a.weight'\] has shape \(3, 3\) \(9 entries\), parameter 'a.weight' has 6"),
        ({"a.weight": torch.ones(6), "c.weight": torch.ones(2)}, True, r"state for parameter 'c.weight', which this run does not select"),
        ({"a.weight": torch.ones(6, dtype=torch.int64)}, True, r"has dtype torch.int64"),
        ({"b.bias": torch.tensor([1.0, float("inf"), 0.0])}, True, r"\['b.bias'\] holds 1 NaN/inf value\(s\) among 3"),
        ({"b.bias": torch.tensor([float("nan")])}, False, r"holds 1 NaN/inf"),
    ],
)
def test_the_check_names_the_file_and_the_tensor(ema, whole, match):
    with pytest.raises(StateFileError, match=match):
        check_loaded_state(state_of(ema), PARAMS, source="f", whole=whole)


def test_partitioned_state_is_not_held_to_the_whole_size():
    # a ZeRO or FSDP rank keeps the state of its own slice: only names, dtypes and values are checked
    check_loaded_state(state_of({"a.weight": torch.ones(2)}), PARAMS, source="f", whole=False)
