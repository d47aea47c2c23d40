"""Saving masker/strategy state with a checkpoint: tensors to safetensors, everything else to JSON.

Nothing is pickled, so loading a checkpoint never executes code from it.

Layout (format 2): ``<stem>.safetensors`` holds the tensors under the names ``"0"``, ``"1"``, ... in the order
they occur in the state, and a random ``gmt_state_id`` in its metadata. ``<stem>.json`` holds
``{"format": 2, "state": <skeleton>, "tensors": {"file", "bytes", "id", "sha256"}}`` where each tensor in the
skeleton is ``{"__tensor__": "<name>"}`` and ``sha256`` maps each tensor's name to the hash of its bytes.
Tensors are numbered, never named after their path, so keys may contain any character (a ``"a.b"`` key and
an ``{"a": {"b": ...}}`` nest cannot collide), and the key ``"__tensor__"`` is reserved.

Crash safety: each file is written to a temporary name and moved into place with ``os.replace``, tensors
first and the JSON that names them last. A save interrupted before the JSON is in place leaves no state
(:func:`has_state` is false); one interrupted later leaves files whose size or id disagree with the JSON,
which :func:`load_state` reports as an error naming the file.

Integrity: the size and id say which save a tensor file belongs to; the per-tensor ``sha256`` says its data is
the data that save wrote, so bytes damaged in place (size and header kept) are refused with the file and the
tensor named. Records written before the hashes existed are read without that check.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import uuid
from typing import Any

import torch

STEM = "gmt_state"
FORMAT = 2
_TENSOR_REF = "__tensor__"
_ID_KEY = "gmt_state_id"


class StateFileError(ValueError):
    """A GMT state file that cannot be read or does not match the JSON that names it."""


# -- the skeleton ----------------------------------------------------------------------------


def _split(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR_REF: name}
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"state keys must be strings at {path or '<root>'}, got {key!r}")
            if key == _TENSOR_REF:
                raise TypeError(f"state key {_TENSOR_REF!r} at {path or '<root>'} is reserved by gmt_plugins.state_io")
        return {k: _split(v, f"{path}[{k!r}]", tensors) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, f"{path}[{i}]", tensors) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"state value at {path or '<root>'} has type {type(value).__name__}; use tensors, numbers, strings, lists or dicts")


def _join(value: Any, tensors: dict[str, torch.Tensor], source: str) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR_REF}:
            name = value[_TENSOR_REF]
            if name not in tensors:
                raise StateFileError(
                    f"{source} names tensor {name!r}, which its safetensors file does not hold; the checkpoint is "
                    "inconsistent, resume from another checkpoint"
                )
            return tensors[name]
        return {k: _join(v, tensors, source) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors, source) for v in value]
    return value


def encode(state: dict[str, Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """``state`` as a JSON-able skeleton and the tensors it refers to."""
    tensors: dict[str, torch.Tensor] = {}
    return _split(state, "", tensors), tensors


def tensor_paths(skeleton: Any, path: str = "") -> dict[str, str]:
    """Where each tensor of ``skeleton`` sits in the state (``"['strategy_state']['ema']['w']"``), by tensor name."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR_REF}:
            return {str(skeleton[_TENSOR_REF]): path or "<root>"}
        return {name: where for k, v in skeleton.items() for name, where in tensor_paths(v, f"{path}[{k!r}]").items()}
    if isinstance(skeleton, list):
        return {name: where for i, v in enumerate(skeleton) for name, where in tensor_paths(v, f"{path}[{i}]").items()}
    return {}


def tensor_digest(tensor: torch.Tensor) -> str:
    """The SHA-256 of ``tensor``'s bytes (CPU, contiguous), as hex."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().data).hexdigest()


def decode(skeleton: Any, tensors: dict[str, torch.Tensor], *, source: str = "GMT state") -> Any:
    """The inverse of :func:`encode`; ``source`` names the file in errors."""
    return _join(skeleton, tensors, source)


# -- atomic files ----------------------------------------------------------------------------


def _replace_atomically(path: str, write: Any) -> None:
    """Write through ``write(tmp_path)`` to a temporary file next to ``path``, then move it into place."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the other checkpoint files follow the umask
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(obj: Any, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)

    _replace_atomically(path, write)


def write_tensors(tensors: dict[str, torch.Tensor], directory: str, *, stem: str = STEM) -> dict[str, Any]:
    """Write ``tensors`` to ``<directory>/<stem>.safetensors``; returns the record the JSON keeps of it."""
    from safetensors.torch import save_file

    file = f"{stem}.safetensors"
    path = os.path.join(directory, file)
    state_id = uuid.uuid4().hex
    _replace_atomically(path, lambda tmp: save_file(tensors, tmp, metadata={_ID_KEY: state_id}))
    digests = {name: tensor_digest(tensor) for name, tensor in tensors.items()}
    return {"file": file, "bytes": os.path.getsize(path), "id": state_id, "sha256": digests}


def tensors_match(directory: str, record: dict[str, Any]) -> bool:
    """Whether ``directory`` holds the tensor file ``record`` describes (same size and id)."""
    path = os.path.join(directory, record["file"])
    if not os.path.isfile(path) or os.path.getsize(path) != record.get("bytes"):
        return False
    try:
        return _metadata(path).get(_ID_KEY) == record.get("id")
    except StateFileError:
        return False


def _metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception as err:  # safetensors raises its own error types for truncated or foreign files
        raise StateFileError(
            f"{path} is not a readable safetensors file ({err}); the checkpoint was not completely written, resume "
            "from another checkpoint"
        ) from None


def read_tensors(
    directory: str, record: dict[str, Any], *, named_by: str, paths: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Read the tensor file ``record`` (from the JSON ``named_by``) describes, checking size, id and, where the
    record holds them, each tensor's hash; ``paths`` (from :func:`tensor_paths`) names the tensors in errors."""
    from safetensors.torch import load_file

    path = os.path.join(directory, record["file"])
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{named_by} names {path}, which does not exist; copy the whole checkpoint folder, or resume from another checkpoint"
        )
    size = os.path.getsize(path)
    if size != record.get("bytes"):
        raise StateFileError(
            f"{path} has {size} bytes but {named_by} recorded {record.get('bytes')}: the save was interrupted or the file "
            "was replaced; resume from another checkpoint"
        )
    if _metadata(path).get(_ID_KEY) != record.get("id"):
        raise StateFileError(f"{path} was written by a different save than {named_by} (its id differs); resume from another checkpoint")
    try:
        tensors = load_file(path)
    except Exception as err:
        raise StateFileError(f"{path} could not be read ({err}); resume from another checkpoint") from None
    check_digests(tensors, record.get("sha256"), path=path, named_by=named_by, paths=paths or {})
    return tensors


def check_digests(
    tensors: dict[str, torch.Tensor], digests: Any, *, path: str, named_by: str, paths: dict[str, str]
) -> None:
    """A :class:`StateFileError` naming the file and the tensor whose bytes differ from the hash ``named_by`` recorded."""
    if digests is None:  # written before the hashes were recorded
        return
    if not isinstance(digests, dict) or set(digests) != set(tensors):
        raise StateFileError(
            f"{path} holds tensors {sorted(tensors)} but {named_by} recorded hashes for {sorted(digests) if isinstance(digests, dict) else digests!r}; "
            "the checkpoint is inconsistent, resume from another checkpoint"
        )
    for name in sorted(tensors, key=lambda n: (len(n), n)):
        if tensor_digest(tensors[name]) != digests[name]:
            where = f" ({paths[name]})" if name in paths else ""
            raise StateFileError(
                f"{path}: tensor {name!r}{where} does not hold the data that was saved (its SHA-256 differs from the one "
                f"{named_by} recorded): the file was damaged or changed after the save; resume from another checkpoint"
            )


def read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise StateFileError(
            f"{path} is not valid JSON ({err}): it is truncated or damaged; resume from another checkpoint, or delete "
            "the checkpoint folder if it was never completed"
        ) from None
    except UnicodeDecodeError as err:
        raise StateFileError(f"{path} is not a text file ({err}); resume from another checkpoint") from None


# -- the file pair ---------------------------------------------------------------------------


def save_state(state: dict[str, Any], directory: str, *, stem: str = STEM) -> None:
    """Write ``state`` into ``directory`` as ``<stem>.json`` (+ ``<stem>.safetensors`` if it holds tensors)."""
    skeleton, tensors = encode(state)
    os.makedirs(directory, exist_ok=True)
    record = write_tensors(tensors, directory, stem=stem) if tensors else None
    write_json({"format": FORMAT, "state": skeleton, "tensors": record}, os.path.join(directory, f"{stem}.json"))


def has_state(directory: str, *, stem: str = STEM) -> bool:
    return os.path.isfile(os.path.join(directory, f"{stem}.json"))


def load_state(directory: str, *, stem: str = STEM) -> dict[str, Any]:
    """Read what :func:`save_state` wrote; a damaged or inconsistent pair is a ``ValueError`` naming the file."""
    json_path = os.path.join(directory, f"{stem}.json")
    document = read_json(json_path)
    if not isinstance(document, dict):
        raise StateFileError(f"{json_path} does not hold a GMT state object; resume from another checkpoint")
    if "format" not in document:  # format 1 (gmt_plugins before 2026-11): the skeleton itself, tensors by path
        return _load_format_1(document, directory, stem, json_path)
    if document["format"] != FORMAT or "state" not in document:
        raise StateFileError(f"{json_path} has GMT state format {document.get('format')!r}; this gmt_plugins reads format {FORMAT}")
    record = document.get("tensors")
    tensors = read_tensors(directory, record, named_by=json_path, paths=tensor_paths(document["state"])) if record else {}
    return decode(document["state"], tensors, source=json_path)


def _load_format_1(skeleton: Any, directory: str, stem: str, json_path: str) -> Any:
    from safetensors.torch import load_file

    tensor_path = os.path.join(directory, f"{stem}.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    if os.path.isfile(tensor_path):
        try:
            tensors = load_file(tensor_path)
        except Exception as err:
            raise StateFileError(f"{tensor_path} could not be read ({err}); resume from another checkpoint") from None
    return decode(skeleton, tensors, source=json_path)
