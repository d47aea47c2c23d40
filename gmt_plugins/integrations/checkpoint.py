"""Where ``GMTCallback`` keeps its state in a Trainer checkpoint, and how it finds it again.

The JSON part (step, config, the strategy's skeleton) is the callback's entry in
``TrainerState.stateful_callbacks``, so it lands in ``trainer_state.json`` and comes back with it by every
resume route. Tensors go to ``gmt_state.safetensors`` beside it, written while the Trainer collects the
callback states, before ``trainer_state.json`` and before a hub push. The record in the JSON names the
tensor file with its size and a random id, so a file from another save is never taken for this one.

Under FSDP2 the strategy state is per rank: each rank writes ``gmt_state.rank<r>.json`` (+ tensors)
with :mod:`gmt_plugins.state_io`, and the record in ``trainer_state.json`` keeps the world size.
"""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Any

from gmt_plugins.config import GMTConfig
from gmt_plugins.state_io import (
    FORMAT,
    STEM,
    StateFileError,
    decode,
    encode,
    read_tensors,
    tensor_paths,
    tensors_match,
    write_tensors,
)

CHECKPOINT_PREFIX = "checkpoint"  # transformers.trainer_utils.PREFIX_CHECKPOINT_DIR
RECORD_KEY = "resume_state"
"""The attribute name of GMT's record inside ``stateful_callbacks["GMTCallback"]["attributes"]``."""

RESUME_FIELDS = ("strategy", "mask_ratio", "scope", "strategy_options", "mask_seed", "include", "exclude", "ratio_of")
"""Config fields that decide the masks: a resume with another value would silently change the run."""

_BEFORE_FIELD = {"ratio_of": "all"}
"""The value a field had in effect in checkpoints written before the field existed."""


_RECORD_FIELDS = ("format", "step", "config", "parameters", "world_size", "sharded", "state", "tensors")


def parameter_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def checkpoint_folder(output_dir: str, global_step: int, *, trial_name: str | None, hyper_param_search: bool) -> str:
    """The folder the Trainer is saving ``checkpoint-<global_step>`` into (its run directory, not always ``output_dir``)."""
    name = f"{CHECKPOINT_PREFIX}-{global_step}"
    if not hyper_param_search:
        return os.path.join(output_dir, name)
    if trial_name:
        return os.path.join(output_dir, trial_name, name)
    # Trials without hp_name live in run-<id>/ folders; the one being saved is the one the model was just written to.
    trials = glob.glob(os.path.join(output_dir, "*", name))
    if not trials:
        return os.path.join(output_dir, name)
    return max(trials, key=os.path.getmtime)


def build_record(
    masker_state: dict[str, Any], *, config: GMTConfig, names: list[str], folder: str, world_size: int, sharded: bool
) -> dict[str, Any]:
    """The JSON record for ``trainer_state.json``; writes the tensors into ``folder`` unless ``sharded``."""
    record: dict[str, Any] = {
        "format": FORMAT,
        "step": masker_state["step"],
        "config": config.to_dict(),
        "parameters": {"count": len(names), "sha256": parameter_digest(names)},
        "world_size": world_size,
        "sharded": sharded,
        "folder": folder,  # as the Trainer names it (relative if output_dir is), like best_model_checkpoint
        "state": None,
        "tensors": None,
    }
    if sharded:  # every rank writes its own file: see GMTCallback.on_save
        return record
    skeleton, tensors = encode(masker_state)
    record["state"] = skeleton
    if tensors:
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"GMTCallback: the checkpoint folder {folder} the Trainer is saving does not exist")
        record["tensors"] = write_tensors(tensors, folder)
    return record


def check_record(record: dict[str, Any], *, config: GMTConfig, names: list[str], world_size: int, global_step: int) -> None:
    """A ``ValueError`` naming the field when the checkpoint does not belong to this run's setup."""
    where = f"the GMT state of checkpoint-{global_step} (trainer_state.json)"
    missing = [k for k in _RECORD_FIELDS if k not in record] if isinstance(record, dict) else list(_RECORD_FIELDS)
    if missing:
        raise StateFileError(f"{where} lacks {missing}: it is damaged or was edited; resume from another checkpoint")
    if record.get("format") != FORMAT:
        raise StateFileError(f"{where} has format {record.get('format')!r}; this gmt_plugins reads format {FORMAT}")
    saved, current = record.get("config", {}), config.to_dict()
    saved = {**_BEFORE_FIELD, **saved}
    changed = [f"{f}: saved {saved.get(f)!r}, now {current[f]!r}" for f in RESUME_FIELDS if saved.get(f) != current[f]]
    if changed:
        raise ValueError(
            f"{where} was written with a different GMT config ({'; '.join(changed)}). Resume with the same GMTCallback "
            "settings, or start a new run in a fresh output_dir"
        )
    params = record.get("parameters", {})
    if params.get("count") != len(names) or params.get("sha256") != parameter_digest(names):
        raise ValueError(
            f"{where} covers {params.get('count')} parameter(s), this run selects {len(names)} with different names; "
            "resume with the same model, adapters and include/exclude patterns"
        )
    if record.get("sharded") and record.get("world_size") != world_size:
        raise ValueError(
            f"{where} holds per-rank (FSDP2) state for world size {record.get('world_size')}, this run has {world_size}; "
            "strategy state cannot be re-partitioned: resume with the same number of processes"
        )
    if record.get("step") != global_step:
        raise ValueError(
            f"{where} is for step {record.get('step')}, the Trainer resumes at step {global_step}; the checkpoint is inconsistent"
        )


def load_record(record: dict[str, Any], candidates: list[str]) -> tuple[dict[str, Any], str]:
    """The masker state the record describes, with its tensors from the first candidate folder that holds them,
    and the file it came from (for errors about its content)."""
    tensor_record = record.get("tensors")
    tensors, source = {}, "trainer_state.json"
    paths = tensor_paths(record["state"])
    if tensor_record:
        folders = list(dict.fromkeys(c for c in [*candidates, record.get("folder")] if c))
        found = next((f for f in folders if tensors_match(f, tensor_record)), None)
        if found is None:
            damaged = next((f for f in folders if os.path.isfile(os.path.join(f, tensor_record["file"]))), None)
            if damaged is not None:  # say what is wrong with it (size, id, unreadable) rather than only "not found"
                read_tensors(damaged, tensor_record, named_by=os.path.join(damaged, "trainer_state.json"), paths=paths)
            raise FileNotFoundError(
                f"the GMT state in trainer_state.json names {tensor_record['file']} (id {tensor_record['id']}), but none of "
                f"{folders} holds it. Keep {tensor_record['file']} beside trainer_state.json, or name the checkpoint folder "
                "in TrainingArguments(resume_from_checkpoint=...)"
            )
        tensors = read_tensors(found, tensor_record, named_by=os.path.join(found, "trainer_state.json"), paths=paths)
        source = os.path.join(found, tensor_record["file"])
    return decode(record["state"], tensors, source="trainer_state.json"), source


def rank_stem(rank: int) -> str:
    return f"{STEM}.rank{rank}"
