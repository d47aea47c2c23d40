"""Compiled CPU kernels, loaded with ``ctypes``: the selection engine's histogram passes and strict
mode's copy-out and write-back of masked entries.

On CPU the engine's cost is its histogram passes. In torch ops each pass is a chain of
elementwise ops and an ``index_add_``, about 1.5-2.5 ns per entry; the C loop in
``gmt_plugins/_native/histogram.c`` computes the key and counts it in one read, about 0.6 ns.

The C source ships with the package and is compiled on first use by the system C compiler
(``$CC``, else ``cc``) into ``$GMT_PLUGINS_CACHE/native`` (default ``~/.cache/gmt_plugins/native``),
under a name that hashes the source, the compiler and its flags, so each machine builds it once
(in well under a second; no torch headers, no ninja). The folder is created private (0700); a
folder or library owned by another user or writable by others is refused, and so is a library
missing a symbol: in ``auto`` mode with one warning, then the torch passes run. The pure-torch passes in
:mod:`gmt_plugins.selection` are its reference twin and give identical histograms.

``GMT_PLUGINS_NATIVE`` chooses:

- ``auto`` (default): use the kernel when it builds, else warn once and run the torch passes;
- ``0``: never use it;
- ``1``: require it, and raise when it cannot be built.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

ENV = "GMT_PLUGINS_NATIVE"
MODES = ("auto", "0", "1")
CFLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
SOURCE = Path(__file__).parent / "engine" / "csrc" / "gmt_kernels.c"
HIST_BINS = (1 << 16) + 2

# (dtype, key width) -> C function: which flats the kernel computes keys for itself, exactly as
# MagnitudeKeys.keys does. fp16 widened to 32 bits goes through fp32 in torch, so it stays there.
_FUNCTIONS = {
    (torch.float32, 32): "gmt_hist_f32",
    (torch.bfloat16, 32): "gmt_hist_bf16_wide",
    (torch.bfloat16, 16): "gmt_hist_16",
    (torch.float16, 16): "gmt_hist_16",
}

# element size in bytes -> (gather, scatter) of strict mode's masked entries
_MOVES = {2: ("gmt_gather_masked_16", "gmt_scatter_masked_16"), 4: ("gmt_gather_masked_32", "gmt_scatter_masked_32"),
          8: ("gmt_gather_masked_64", "gmt_scatter_masked_64")}

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | str] = {}  # compiler -> library, or the reason it failed
_warned: set[str] = set()


class NativeUnavailable(RuntimeError):
    """The kernel was required (``GMT_PLUGINS_NATIVE=1``) but could not be built or loaded."""


def mode() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={value!r} is not valid; allowed values: {', '.join(MODES)}")
    return value


def cache_dir() -> Path:
    root = os.environ.get("GMT_PLUGINS_CACHE") or Path.home() / ".cache" / "gmt_plugins"
    return Path(root).expanduser() / "native"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


# Every symbol any module looks up: one missing is a load failure here, not an AttributeError mid-step.
REQUIRED_SYMBOLS = (
    *sorted(set(_FUNCTIONS.values())), *(n for pair in _MOVES.values() for n in pair),
    "gmt_rank_group", "gmt_apply", "gmt_ema_f32", "gmt_count_nonfinite_f32",
    "gmt_id3_grow", "gmt_coverage_observe", "gmt_apply_tracked",
    "gmt_random_rank", "gmt_apply_preselected", "gmt_ema_rank", "gmt_ema_rank_groups",
    "gmt_pack_mask_bits", "gmt_apply_mask_bits", "gmt_accumulate_finite_f32", "gmt_score_keys_f32",
)


def _private_dir(folder: Path) -> Path:
    """``folder``, created 0700 if missing. The library in it is loaded into this process, so a folder
    (or library) that another user owns or can write is refused: it would let them run code here."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(folder)
    return folder


def _check_private(path: Path) -> None:
    if not hasattr(os, "getuid"):  # no POSIX owners (Windows): nothing to compare
        return
    info = path.stat()
    if info.st_uid != os.getuid():
        raise NativeUnavailable(f"{path} belongs to uid {info.st_uid}, not to this user ({os.getuid()}); refusing to load code from it")
    if info.st_mode & 0o022:
        raise NativeUnavailable(
            f"{path} is writable by other users (mode {oct(info.st_mode & 0o777)}); refusing to load code from it "
            f"(chmod go-w it, or point GMT_PLUGINS_CACHE at a private folder)"
        )


BUILD_TIMEOUT_S = 600
"""Wall-clock limit of one compiler run: about 15 s of CPU, far longer on a loaded machine."""


def _compile(command: list[str], compiler: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NativeUnavailable(f"{compiler} took longer than {BUILD_TIMEOUT_S} s to build {SOURCE.name}") from None


def _build(compiler: str) -> ctypes.CDLL:
    """Compile (once per machine; concurrent processes race harmlessly) and load the kernel."""
    path = shutil.which(compiler)
    if path is None:
        raise NativeUnavailable(f"no C compiler found (tried {compiler!r}; set CC to choose one)")
    sources = b"".join(p.read_bytes() for p in sorted(SOURCE.parent.glob("*.[ch]")))
    digest = hashlib.sha256(sources + "\0".join((path, *CFLAGS)).encode()).hexdigest()[:16]
    target = _private_dir(cache_dir()) / f"histogram-{digest}-{platform.machine()}.so"
    if not target.exists():
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = _compile([path, *CFLAGS, "-o", tmp, str(SOURCE)], compiler)
            if done.returncode != 0:  # e.g. no ifunc support for the AVX2 clones: one portable build
                done = _compile([path, *CFLAGS, "-DGMT_NO_CLONES", "-o", tmp, str(SOURCE)], compiler)
            if done.returncode != 0:
                raise NativeUnavailable(f"{compiler} failed to build {SOURCE.name}: {done.stderr.strip()[-500:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _check_private(target)
    library = ctypes.CDLL(str(target))
    missing = [name for name in REQUIRED_SYMBOLS if not hasattr(library, name)]
    if missing:
        raise NativeUnavailable(f"{target} lacks {', '.join(missing)} (a stale or foreign build); delete it to rebuild")
    for name in set(_FUNCTIONS.values()):
        function = getattr(library, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p]
        function.restype = None
    for name in (n for pair in _MOVES.values() for n in pair):
        function = getattr(library, name)
        function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
        function.restype = ctypes.c_int64
    library.gmt_coverage_observe.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32, ctypes.c_void_p]
    library.gmt_coverage_observe.restype = None
    return library


# (GMT_PLUGINS_NATIVE, CC) as they were when library() last returned the loaded kernel, and the kernel:
# the hot path (several calls per tensor per step) compares two environment reads and one dict entry
# instead of parsing the mode and taking the lock
_last_loaded: tuple[str | None, str | None, ctypes.CDLL] | None = None


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or ``None`` when the mode or the machine rules it out (see the module doc)."""
    global _last_loaded
    last, env, cc = _last_loaded, os.environ.get(ENV), os.environ.get("CC")
    if last is not None and last[0] == env and last[1] == cc and _libraries.get(cc or "cc") is last[2]:
        return last[2]
    chosen = mode()
    if chosen == "0":
        return None
    compiler = _compiler()
    with _lock:
        if compiler not in _libraries:
            try:
                _libraries[compiler] = _build(compiler)
            except (OSError, subprocess.SubprocessError, NativeUnavailable) as error:
                _libraries[compiler] = str(error)
        loaded = _libraries[compiler]
        if isinstance(loaded, str):
            if chosen == "1":
                raise NativeUnavailable(f"{ENV}=1 but the compiled histogram is unavailable: {loaded}")
            if compiler not in _warned:
                _warned.add(compiler)
                warnings.warn(
                    f"gmt_plugins: compiled histogram unavailable ({loaded}); masking uses the pure-torch "
                    f"passes, about 3x slower on CPU. Set {ENV}=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        _last_loaded = (env, cc, loaded)
        return loaded


def supports(flat: torch.Tensor, key_bits: int) -> bool:
    """Whether the kernel computes ``MagnitudeKeys`` keys of width ``key_bits`` for ``flat``."""
    return flat.device.type == "cpu" and flat.is_contiguous() and (flat.dtype, key_bits) in _FUNCTIONS


def add_histogram(lib: ctypes.CDLL, flat: torch.Tensor, key_bits: int, base: int, shift: int, hist: torch.Tensor) -> None:
    """Add to ``hist`` (``HIST_BINS`` int64: below, 65,536 digits, above) the digit histogram of the
    magnitude keys of ``flat``: keys below ``base``, digits ``(key - base) >> shift``, keys above."""
    if not (supports(flat, key_bits) and 0 <= base < 1 << key_bits and 0 <= shift <= key_bits - 16):
        raise ValueError(f"kernel cannot histogram {flat.dtype} {flat.device} keys of {key_bits} bits at base={base} shift={shift}")
    if hist.dtype != torch.int64 or hist.numel() != HIST_BINS or not hist.is_contiguous() or hist.device.type != "cpu":
        raise ValueError(f"hist must be a contiguous CPU int64 tensor of {HIST_BINS} bins")
    if flat.numel():
        getattr(lib, _FUNCTIONS[(flat.dtype, key_bits)])(flat.data_ptr(), flat.numel(), base, shift, hist.data_ptr())


def supports_moves(flat: torch.Tensor) -> bool:
    """Whether :func:`gather_masked` and :func:`scatter_masked` take ``flat``."""
    return flat.device.type == "cpu" and flat.is_contiguous() and flat.element_size() in _MOVES


def gather_masked(lib: ctypes.CDLL, flat: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``flat[mask]`` for a flat bool ``mask`` with ``count`` true entries, as a tensor of ``count + 1``
    slots (the last is scratch for :func:`scatter_masked`)."""
    _check_moves(flat, mask)
    out = torch.empty(count + 1, dtype=flat.dtype)
    found = getattr(lib, _MOVES[flat.element_size()][0])(mask.data_ptr(), flat.data_ptr(), out.data_ptr(), flat.numel(), count)
    if found != count:
        raise RuntimeError(f"mask holds {found} entries, expected {count}")
    return out


def scatter_masked(lib: ctypes.CDLL, flat: torch.Tensor, mask: torch.Tensor, saved: torch.Tensor) -> None:
    """``flat[mask] = saved[:-1]`` for the output of :func:`gather_masked` on the same mask."""
    _check_moves(flat, mask)
    if saved.dtype != flat.dtype or not saved.is_contiguous() or saved.numel() < 1:
        raise ValueError("saved must be gather_masked's output for this tensor")
    found = getattr(lib, _MOVES[flat.element_size()][1])(mask.data_ptr(), flat.data_ptr(), saved.data_ptr(), flat.numel(), saved.numel() - 1)
    if found != saved.numel() - 1:
        raise RuntimeError(f"mask holds {found} entries, {saved.numel() - 1} were saved")


def _check_moves(flat: torch.Tensor, mask: torch.Tensor) -> None:
    if not supports_moves(flat):
        raise ValueError(f"kernel cannot move entries of a {flat.dtype} {flat.device} tensor (contiguous={flat.is_contiguous()})")
    if mask.dtype != torch.bool or mask.numel() != flat.numel() or not mask.is_contiguous() or mask.device.type != "cpu":
        raise ValueError("mask must be a contiguous CPU bool tensor shaped like the flat tensor")
