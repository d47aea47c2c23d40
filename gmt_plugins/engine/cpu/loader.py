"""The compiled CPU kernel: built once per machine, verified, and loaded with ``ctypes``.

On CPU the engine's cost is its passes over the keys. In torch ops each pass is a chain of
elementwise ops and an ``index_add_``, about 1.5-2.5 ns per entry; the C loops in
``gmt_plugins/engine/csrc`` compute the key and count it in one read, about 0.6 ns.

The C sources ship with the package and are compiled on first use by the system C compiler
(``$CC``, split as a shell would, so ``CC="gcc -O2"`` works; else ``cc``) into
``$GMT_PLUGINS_CACHE/native`` (default ``~/.cache/gmt_plugins/native``), under a name that hashes
the sources, the compiler and its flags, so each machine builds it once (a few seconds; no torch
headers, no ninja). Beside the library a small sidecar records its size and SHA-256; a library
whose sidecar is missing or disagrees (a truncated file would crash the process inside ``dlopen``)
is rebuilt, never loaded. Builds are atomic: each process compiles into its own temporary file
and renames it into place, so concurrent builds race harmlessly; temporary files that a killed
process left behind are swept after an hour.

The folder is created private (0700); a folder or library owned by another user or writable by
others is refused, and so is a library missing a symbol: :func:`library` then warns once and
returns ``None`` (the torch passes run), or raises when the kernel is required. A compiler that rejects the AVX2 clones gets one portable build (cached
under its own name, announced once: masking is then slower); a compiler that fails otherwise, is
killed or runs out of time gives no library at all. The pure-torch passes in
:mod:`gmt_plugins.engine.reference` are the kernel's reference twin and give identical results.

Whether the kernel may be used at all (``GMT_PLUGINS_NATIVE``: ``auto``, ``0``, ``1``) is decided in
:mod:`gmt_plugins.engine.dispatch`, the only caller of :func:`library`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

from gmt_plugins.engine.cpu import signatures

CFLAGS = ("-O3", "-ffp-contract=off", "-shared", "-fPIC")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCE = CSRC / "gmt_kernels.c"
"""The one translation unit: it includes every other file of :data:`CSRC`."""
REQUIRED_SYMBOLS = signatures.REQUIRED_SYMBOLS

BUILD_TIMEOUT_S = 600
"""Wall-clock limit of one compiler run: about 15 s of CPU, far longer on a loaded machine."""
STALE_TEMP_S = 3600
"""A temporary build file older than this belongs to a process that died mid-build: it is removed."""
TEMP_PREFIX = ".build-"
SIDECAR_SUFFIX = ".sha256"

# A failed build whose message names one of these rejected the AVX2 clones or intrinsics (no ifunc
# on this platform, no AVX2 support in this compiler): the portable build (-DGMT_NO_CLONES) serves.
# Any other failure (a syntax error, a compiler killed for memory, which gcc reports as a positive
# status) is no reason to cache a slower kernel.
_CLONES_REJECTED = re.compile(r"ifunc|target_clones|multiversion|avx2|immintrin|__m256|target specific option", re.IGNORECASE)
_PACKAGE_DIR = str(Path(__file__).resolve().parents[2]) + os.sep

_lock = threading.Lock()
_libraries: dict[str, ctypes.CDLL | str] = {}  # CC as set -> library, or the reason it failed
_warned: set[str] = set()


class NativeUnavailable(RuntimeError):
    """The kernel was required (``GMT_PLUGINS_NATIVE=1``) but could not be built or loaded."""


def cache_dir() -> Path:
    root = os.environ.get("GMT_PLUGINS_CACHE") or Path.home() / ".cache" / "gmt_plugins"
    return Path(root).expanduser() / "native"


def _compiler() -> str:
    return os.environ.get("CC") or "cc"


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


# --- verified libraries: a sidecar with the size and SHA-256 of what was built -----------------


def _sidecar(library: Path) -> Path:
    return library.with_name(library.name + SIDECAR_SUFFIX)


def _fingerprint(path: Path) -> str:
    data = path.read_bytes()
    return f"{len(data)} {hashlib.sha256(data).hexdigest()}"


def _verified(library: Path) -> bool:
    """Whether ``library`` is whole: its size and hash are those its sidecar recorded at build time.
    Checked before ``dlopen``, which crashes the process (SIGBUS) on a truncated library."""
    try:
        return _sidecar(library).read_text().strip() == _fingerprint(library)
    except (OSError, UnicodeDecodeError):
        return False


def _write_atomically(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=SIDECAR_SUFFIX, dir=target.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text + "\n")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _sweep_stale_temps(folder: Path) -> None:
    """Remove temporary build files that a process killed mid-build left behind (a live build's are
    younger than :data:`STALE_TEMP_S`: a compiler run is limited to :data:`BUILD_TIMEOUT_S`)."""
    now = time.time()
    for leftover in folder.glob(TEMP_PREFIX + "*"):
        try:
            if now - leftover.stat().st_mtime > STALE_TEMP_S:
                leftover.unlink()
        except OSError:  # another process swept it first
            pass


# --- building -------------------------------------------------------------------------------------


def _command(compiler: str) -> list[str]:
    """``$CC`` as a shell splits it, its program resolved on ``PATH``."""
    try:
        words = shlex.split(compiler)
    except ValueError as error:
        raise NativeUnavailable(f"CC={compiler!r} cannot be split into words: {error}") from None
    path = shutil.which(words[0]) if words else None
    if path is None:
        raise NativeUnavailable(f"no C compiler found (tried {compiler!r}; set CC to choose one)")
    return [path, *words[1:]]


def _library_names(command: list[str]) -> tuple[Path, Path]:
    """The cached library's path with the AVX2 clones, and the portable build's."""
    hasher = hashlib.sha256()
    for source in sorted(CSRC.glob("*.[ch]")):
        hasher.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    hasher.update("\0".join((*command, *CFLAGS)).encode())
    stem = f"gmt_kernels-{hasher.hexdigest()[:16]}-{platform.machine()}"
    folder = _private_dir(cache_dir())
    return folder / f"{stem}.so", folder / f"{stem}-portable.so"


def _compile(command: list[str], flags: tuple[str, ...], output: str) -> subprocess.CompletedProcess:
    full = [*command, *CFLAGS, *flags, "-o", output, str(SOURCE)]
    try:
        return subprocess.run(full, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise NativeUnavailable(f"{shlex.join(command)} took longer than {BUILD_TIMEOUT_S} s to build {SOURCE.name}") from None


def _failure(command: list[str], done: subprocess.CompletedProcess) -> NativeUnavailable:
    status = f"was killed by signal {-done.returncode}" if done.returncode < 0 else f"exited with status {done.returncode}"
    message = (done.stderr or done.stdout or "").strip()[-500:] or "(no message)"
    return NativeUnavailable(f"failed to build {SOURCE.name}: `{shlex.join(done.args)}` {status}: {message}")


def _build_into(target: Path, command: list[str], flags: tuple[str, ...]) -> subprocess.CompletedProcess:
    """Compile into a temporary file of this process and, when it succeeds, rename it to ``target``
    and record its sidecar. The temporary file goes on every exit path Python sees."""
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = _compile(command, flags, tmp)
        if done.returncode == 0:
            fingerprint = _fingerprint(Path(tmp))
            os.replace(tmp, target)
            _write_atomically(_sidecar(target), fingerprint)
        return done
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(compiler: str) -> tuple[Path, bool]:
    """The verified library for ``compiler`` (``$CC``), built if needed, and whether it is the
    portable build."""
    command = _command(compiler)
    target, portable = _library_names(command)
    if target.exists():
        _check_private(target)
        if _verified(target):
            return target, False
    elif portable.exists():  # this compiler rejected the clones before: they are not tried again
        _check_private(portable)
        if _verified(portable):
            return portable, True
    _sweep_stale_temps(target.parent)
    done = _build_into(target, command, ())
    if done.returncode == 0:
        return target, False
    if done.returncode > 0 and _CLONES_REJECTED.search(done.stderr or ""):
        retry = _build_into(portable, command, ("-DGMT_NO_CLONES",))
        if retry.returncode == 0:
            return portable, True
    raise _failure(command, done)


def _load(library: Path) -> ctypes.CDLL:
    _check_private(library)
    loaded = ctypes.CDLL(str(library))
    missing = [name for name in REQUIRED_SYMBOLS if not hasattr(loaded, name)]
    if missing:
        raise NativeUnavailable(f"{library} lacks {', '.join(missing)} (a stale or foreign build); delete it to rebuild")
    signatures.declare(loaded)
    return loaded


# decorators' wrapper frames between a gmt_plugins function and its caller (torch.no_grad and the like)
_WRAPPER_MODULES = frozenset({"contextlib", "functools", "torch.utils._contextlib"})


def _outside_stacklevel() -> int:
    """The ``stacklevel`` of the nearest caller outside gmt_plugins (and the decorators wrapping its
    functions), so that a warning names the user's line, not the library's."""
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        frame.f_code.co_filename.startswith(_PACKAGE_DIR) or frame.f_globals.get("__name__") in _WRAPPER_MODULES
    ):
        frame, level = frame.f_back, level + 1
    return level


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=_outside_stacklevel())


# CC as it was when library() last returned the loaded kernel, and the kernel: the hot path (several
# calls per tensor per step) compares one environment read and one dict entry instead of taking the lock
_last_loaded: tuple[str | None, ctypes.CDLL] | None = None


def library(*, required: bool = False) -> ctypes.CDLL | None:
    """The loaded kernel, built on first use; ``None`` (with one warning) when this machine cannot build
    or load it, or :class:`NativeUnavailable` when it is ``required``. Whether it may be used at all
    (``GMT_PLUGINS_NATIVE``) is :mod:`gmt_plugins.engine.dispatch`'s decision."""
    global _last_loaded
    last, cc = _last_loaded, os.environ.get("CC")
    if last is not None and last[0] == cc and _libraries.get(cc or "cc") is last[1]:
        return last[1]
    compiler = _compiler()
    with _lock:
        if compiler not in _libraries:
            try:
                path, portable = _build(compiler)
                _libraries[compiler] = _load(path)
                if portable:
                    _warn_once(
                        f"portable:{compiler}",
                        f"gmt_plugins: {compiler} rejected the AVX2 clones of the compiled kernel, so it runs its "
                        f"portable build ({path.name}): masking is slower than with the clones.",
                    )
            except (OSError, subprocess.SubprocessError, NativeUnavailable) as error:
                _libraries[compiler] = str(error)
        loaded = _libraries[compiler]
        if isinstance(loaded, str):
            if required:
                raise NativeUnavailable(f"GMT_PLUGINS_NATIVE=1 but the compiled kernel is unavailable: {loaded}")
            _warn_once(
                compiler,
                f"gmt_plugins: compiled kernel unavailable ({loaded}); masking uses the pure-torch passes, "
                "many times slower on CPU (benchmarks/strategy_cost.py --rows gmt:tensor run with GMT_PLUGINS_NATIVE=0 "
                "and with GMT_PLUGINS_NATIVE=1 measures it). Set GMT_PLUGINS_NATIVE=0 to silence this.",
            )
            return None
        _last_loaded = (cc, loaded)
        return loaded
