"""Failure injection: damaged, half-written or foreign GMT state is an error naming the file or field, never a
silent wrong resume; interrupted saves leave the previous state intact."""

from __future__ import annotations

import json
import os

import pytest
import torch

from gmt_plugins import state_io
from gmt_plugins.state_io import StateFileError, has_state, load_state, save_state

# --- state_io -------------------------------------------------------------------------------


def test_dotted_keys_and_nesting_do_not_collide(tmp_path):
    state = {"a": {"b": torch.zeros(2)}, "a.b": torch.ones(3), "x": [{"y.0": torch.full((1,), 7.0)}]}
    save_state(state, str(tmp_path))
    loaded = load_state(str(tmp_path))
    assert torch.equal(loaded["a"]["b"], torch.zeros(2)) and torch.equal(loaded["a.b"], torch.ones(3))
    assert torch.equal(loaded["x"][0]["y.0"], torch.full((1,), 7.0))


def test_reserved_key_is_refused(tmp_path):
    with pytest.raises(TypeError, match="__tensor__.*reserved"):
        save_state({"s": {"__tensor__": "0"}}, str(tmp_path))


def test_truncated_json_names_the_file_and_the_fix(tmp_path):
    save_state({"step": 3, "ema": torch.ones(4)}, str(tmp_path))
    path = tmp_path / "gmt_state.json"
    path.write_text(path.read_text()[:20])
    with pytest.raises(StateFileError, match=rf"{path}.*truncated.*resume from another checkpoint"):
        load_state(str(tmp_path))


def test_truncated_tensors_name_the_file(tmp_path):
    save_state({"step": 3, "ema": torch.ones(100)}, str(tmp_path))
    path = tmp_path / "gmt_state.safetensors"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(StateFileError, match=rf"{path} has \d+ bytes but .*gmt_state.json recorded"):
        load_state(str(tmp_path))


def test_missing_tensors_name_the_file(tmp_path):
    save_state({"ema": torch.ones(2)}, str(tmp_path))
    os.remove(tmp_path / "gmt_state.safetensors")
    with pytest.raises(FileNotFoundError, match="gmt_state.safetensors, which does not exist"):
        load_state(str(tmp_path))


def test_save_interrupted_before_the_json_is_invisible_or_an_error(tmp_path, monkeypatch):
    fresh, reused = tmp_path / "fresh", tmp_path / "reused"
    save_state({"step": 1, "ema": torch.zeros(3)}, str(reused))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed between the tensors and the JSON")

    monkeypatch.setattr(state_io, "write_json", crash)
    for folder in (fresh, reused):
        with pytest.raises(KeyboardInterrupt):
            save_state({"step": 2, "ema": torch.ones(3)}, str(folder))
    assert not has_state(str(fresh))  # a first save that never finished leaves no state to resume from
    # over an older save: the old JSON no longer matches the new tensors, and says so instead of mixing them
    with pytest.raises(StateFileError, match="written by a different save"):
        load_state(str(reused))


def test_a_crash_while_writing_a_file_leaves_no_partial_file(tmp_path, monkeypatch):
    import safetensors.torch

    save_state({"step": 1, "ema": torch.zeros(3)}, str(tmp_path))
    good = load_state(str(tmp_path))

    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_state({"step": 2, "ema": torch.ones(3)}, str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gmt_state.json", "gmt_state.safetensors"]  # no temp files
    assert torch.equal(load_state(str(tmp_path))["ema"], good["ema"])  # the previous save is intact


def test_format_1_files_still_load(tmp_path):
    from safetensors.torch import save_file

    save_file({"strategy_state.ema.a.weight": torch.ones(2)}, str(tmp_path / "gmt_state.safetensors"))
    skeleton = {"step": 3, "strategy_state": {"ema": {"a.weight": {"__tensor__": "strategy_state.ema.a.weight"}}}}
    (tmp_path / "gmt_state.json").write_text(json.dumps(skeleton))
    assert torch.equal(load_state(str(tmp_path))["strategy_state"]["ema"]["a.weight"], torch.ones(2))


# --- through the Trainer --------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from gmt_plugins import GMTCallback  # noqa: E402
from gmt_plugins.integrations import checkpoint as checkpoint_module  # noqa: E402
from tiny_trainer import params, tiny_trainer  # noqa: E402


def momentum(**overrides) -> GMTCallback:
    return GMTCallback(**{"mask_ratio": 0.3, "strategy": "gmt_momentum", "mask_seed": 5, **overrides})


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    trainer = tiny_trainer(folder, momentum())
    trainer.train()
    # out of the reach of the folder recorded in the checkpoint: the copies below are the only ones
    os.replace(folder / "checkpoint-2", folder / "pristine")
    return folder, params(trainer)


def edit_record(checkpoint, **changes):
    path = checkpoint / "trainer_state.json"
    document = json.loads(path.read_text())
    document["stateful_callbacks"]["GMTCallback"]["attributes"]["resume_state"].update(changes)
    path.write_text(json.dumps(document))


def copy_checkpoint(saved_run, tmp_path):
    import shutil

    folder, _ = saved_run
    target = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(folder / "pristine", target)
    return target


def test_killed_during_a_checkpoint_save_then_resume_from_the_previous_one(tmp_path, saved_run, monkeypatch):
    real = checkpoint_module.write_tensors
    calls = []

    def dies_on_second_save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while saving checkpoint-4")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "write_tensors", dies_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        tiny_trainer(tmp_path, momentum()).train()
    monkeypatch.setattr(checkpoint_module, "write_tensors", real)
    broken = tmp_path / "checkpoint-4"
    assert broken.is_dir() and not (broken / "trainer_state.json").exists() and not (broken / "gmt_state.safetensors").exists()
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):  # the Trainer's own refusal of a half-saved checkpoint
        tiny_trainer(tmp_path, momentum()).train(resume_from_checkpoint=True)
    resumed = tiny_trainer(tmp_path, momentum())
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    got = params(resumed)
    assert all(torch.equal(v, got[n]) for n, v in saved_run[1].items())


def test_replaced_tensor_file_is_an_error_naming_it(tmp_path, saved_run):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    save_state({"ema": torch.zeros(3)}, str(tmp_path / "other"))
    os.replace(tmp_path / "other" / "gmt_state.safetensors", checkpoint / "gmt_state.safetensors")
    with pytest.raises(StateFileError, match=r"gmt_state.safetensors has \d+ bytes but .*trainer_state.json recorded"):
        tiny_trainer(tmp_path / "run", momentum(), resume_from_checkpoint=str(checkpoint)).train(resume_from_checkpoint=str(checkpoint))


def test_truncated_tensor_file_in_a_checkpoint_is_an_error(tmp_path, saved_run):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    path = checkpoint / "gmt_state.safetensors"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(StateFileError, match=rf"{path} has \d+ bytes but"):
        tiny_trainer(tmp_path / "run", momentum()).train(resume_from_checkpoint=str(checkpoint))


def test_missing_tensor_file_in_a_checkpoint_is_an_error_naming_the_fix(tmp_path, saved_run):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    os.remove(checkpoint / "gmt_state.safetensors")
    with pytest.raises(FileNotFoundError, match=r"names gmt_state.safetensors .*none of .*holds it. Keep gmt_state.safetensors beside"):
        tiny_trainer(tmp_path / "run", momentum()).train(resume_from_checkpoint=str(checkpoint))


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"strategy": "gmt"}, r"strategy: saved 'gmt_momentum', now 'gmt'"),
        ({"mask_ratio": 0.5}, r"mask_ratio: saved 0.3, now 0.5"),
        ({"scope": "global"}, r"scope: saved 'tensor', now 'global'"),
        ({"mask_seed": 6}, r"mask_seed"),
        ({"exclude": ["head"]}, r"exclude"),
    ],
)
def test_checkpoint_from_another_config_is_refused_naming_the_field(tmp_path, saved_run, overrides, needle):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    with pytest.raises(ValueError, match=rf"different GMT config \(.*{needle}"):
        tiny_trainer(tmp_path / "run", momentum(**overrides)).train(resume_from_checkpoint=str(checkpoint))


def test_checkpoint_of_other_parameters_is_refused(tmp_path, saved_run):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    edit_record(checkpoint, parameters={"count": 3, "sha256": "0"})
    with pytest.raises(ValueError, match="covers 3 parameter"):
        tiny_trainer(tmp_path / "run", momentum()).train(resume_from_checkpoint=str(checkpoint))


def test_per_rank_checkpoint_from_another_world_size_is_refused(tmp_path, saved_run):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    edit_record(checkpoint, sharded=True, world_size=2)  # as an FSDP2 run on 2 processes writes it
    with pytest.raises(ValueError, match="world size 2, this run has 1.*same number of processes"):
        tiny_trainer(tmp_path / "run", momentum()).train(resume_from_checkpoint=str(checkpoint))


def test_restore_callback_states_from_checkpoint_rebuilds_a_working_callback(tmp_path, saved_run):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    trainer = tiny_trainer(tmp_path / "run", momentum(), restore_callback_states_from_checkpoint=True)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    restored = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GMTCallback)]
    assert len(restored) == 1 and restored[0].masker.step == 4
    got = params(trainer)
    assert all(torch.equal(v, got[n]) for n, v in saved_run[1].items())


# --- what a pushed checkpoint holds, and where it is written --------------------------------


def test_tensors_are_in_the_checkpoint_before_it_is_pushed(tmp_path):
    """``push_to_hub`` with ``hub_strategy="checkpoint"`` uploads the folder inside ``_save_checkpoint``, before ``on_save``."""
    from transformers import Trainer

    pushed = {}

    class Recording(Trainer):
        def _push_from_checkpoint(self, checkpoint_folder):  # stands in for the upload: what would it send?
            state = json.loads((tmp_path / os.path.basename(checkpoint_folder) / "trainer_state.json").read_text())
            pushed[os.path.basename(checkpoint_folder)] = (
                sorted(os.listdir(checkpoint_folder)), state["stateful_callbacks"]["GMTCallback"]["attributes"]["resume_state"]["step"]
            )

    trainer = tiny_trainer(tmp_path, momentum(), max_steps=2, trainer_class=Recording)
    trainer.args.push_to_hub = True  # set after __init__, which would otherwise create a hub repository
    trainer.train()
    files, step = pushed["checkpoint-2"]
    assert "gmt_state.safetensors" in files and "trainer_state.json" in files and step == 2


def test_checkpoint_folder_follows_the_trainer_run_directory(tmp_path):
    from gmt_plugins.integrations.checkpoint import checkpoint_folder

    assert checkpoint_folder("out", 3, trial_name=None, hyper_param_search=False) == os.path.join("out", "checkpoint-3")
    assert checkpoint_folder("out", 3, trial_name="trial-a", hyper_param_search=True) == os.path.join("out", "trial-a", "checkpoint-3")
    older, newer = tmp_path / "run-0" / "checkpoint-3", tmp_path / "run-1" / "checkpoint-3"
    older.mkdir(parents=True)
    newer.mkdir(parents=True)
    os.utime(older, (1, 1))  # run-1 is the trial being saved now
    assert checkpoint_folder(str(tmp_path), 3, trial_name=None, hyper_param_search=True) == str(newer)


def test_damaged_record_in_trainer_state_is_an_error_naming_it(tmp_path, saved_run):
    checkpoint = copy_checkpoint(saved_run, tmp_path)
    path = checkpoint / "trainer_state.json"
    document = json.loads(path.read_text())
    del document["stateful_callbacks"]["GMTCallback"]["attributes"]["resume_state"]["state"]
    path.write_text(json.dumps(document))
    with pytest.raises(StateFileError, match=r"trainer_state.json\) lacks \['state'\].*resume from another checkpoint"):
        tiny_trainer(tmp_path / "run", momentum()).train(resume_from_checkpoint=str(checkpoint))


def test_per_rank_state_round_trip_and_world_size_check(tmp_path):
    """The FSDP2 layout on one process (gloo): every rank's file in on_save, the world size in the record."""
    import torch.distributed as dist
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from gmt_plugins.testing import cpu_args
    from tiny_trainer import TinyNet, dataset

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        args = TrainingArguments(output_dir=str(tmp_path), **cpu_args())
        model = TinyNet()
        saving, state = momentum(), TrainerState(global_step=0)
        saving.on_train_begin(args, state, TrainerControl(), model=model)
        x = torch.stack([d["x"] for d in dataset()[:8]])
        y = torch.stack([d["labels"] for d in dataset()[:8]])
        for step in range(2):
            model.zero_grad()
            model(x, y)["loss"].backward()
            saving.on_pre_optimizer_step(args, state, TrainerControl())
            state.global_step = step + 1
        saving.masker.sharded = True  # as after an apply() on FSDP2 shards
        (tmp_path / "checkpoint-2").mkdir()
        exported = saving.state()
        record = exported["attributes"]["resume_state"]
        assert record["sharded"] and record["world_size"] == 1 and record["tensors"] is None
        saving.on_save(args, state, TrainerControl())
        assert (tmp_path / "checkpoint-2" / "gmt_state.rank0.json").is_file()
        assert (tmp_path / "checkpoint-2" / "gmt_state.rank0.safetensors").is_file()

        def resume(record):
            loading = momentum()
            loaded = TrainerState(global_step=2)
            loaded.stateful_callbacks = {"GMTCallback": {"args": exported["args"], "attributes": {"resume_state": record}}}
            loading.on_train_begin(args, loaded, TrainerControl(), model=model)
            return loading

        loading = resume(record)
        for name, ema in saving.masker.strategy.state_dict()["ema"].items():
            assert torch.equal(loading.masker.strategy.state_dict()["ema"][name], ema)
        with pytest.raises(ValueError, match="world size 4, this run has 1"):
            resume({**record, "world_size": 4})
    finally:
        dist.destroy_process_group()
