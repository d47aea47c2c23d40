"""How the compiled CPU kernel is built, cached, verified and loaded (gmt_plugins.engine.cpu.loader),
and its signature table against the C sources.

The kernel is compiled once, by ``built_kernel``, in a fresh process; the other tests copy that build
into a cache of their own, or stand in a fake compiler (a shell script that copies it, after
failing or dying as the test needs) so that a build costs no compile. Whatever can crash the process
(a damaged library) runs in a fresh process.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

import gmt_plugins
from gmt_plugins import GradientMasker
from gmt_plugins.engine import dispatch
from gmt_plugins.engine.cpu import loader, signatures

ROOT = Path(gmt_plugins.__file__).resolve().parents[1]
COMPILER = os.environ.get("CC") or "cc"

pytestmark = pytest.mark.skipif(
    not hasattr(os, "getuid") or shutil.which(COMPILER.split()[0]) is None, reason="needs POSIX owners and a C compiler"
)

# Loads the kernel (GMT_PLUGINS_NATIVE=1) and masks a tensor with it; prints the library's path.
LOAD_AND_MASK = """
import torch
from gmt_plugins import GradientMasker
from gmt_plugins.engine import dispatch
lib = dispatch.kernel()
p = torch.nn.Parameter(torch.zeros(10_000))
p.grad = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
GradientMasker([("w", p)], mask_ratio=0.3).apply()
assert int((p.grad == 0).sum()) == 3000
print(lib._name)
"""


def run_python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "GMT_PLUGINS_CACHE": str(cache), "GMT_PLUGINS_NATIVE": "1", **env,
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory) -> Path:
    """A cache folder holding one build of the kernel, made by a fresh process."""
    cache = tmp_path_factory.mktemp("built")
    done = run_python(LOAD_AND_MASK, cache)
    assert done.returncode == 0, done.stderr
    return cache / "native"


def copy_build(built: Path, cache: Path) -> Path:
    """``built``'s library (and its sidecar) in ``cache``'s private folder; the library's path."""
    folder = cache / "native"
    folder.mkdir(mode=0o700, parents=True)
    for path in built.iterdir():
        shutil.copy2(path, folder / path.name)
    return next(folder.glob("*.so"))


@pytest.fixture
def fresh_loader(tmp_path, monkeypatch) -> Path:
    """This process's loader with nothing loaded and a cache of its own (returned)."""
    monkeypatch.setenv("GMT_PLUGINS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_libraries", {})
    monkeypatch.setattr(loader, "_warned", set())
    monkeypatch.setattr(loader, "_last_loaded", None)
    return tmp_path / "cache"


def fake_compiler(folder: Path, built: Path, first: str = "") -> tuple[Path, Path]:
    """A compiler that logs its arguments, runs the shell line ``first`` for a build with the AVX2
    clones, then copies ``built``'s library to its ``-o`` path. Returns (the script, its log)."""
    script, log = folder / "fake-cc", folder / "fake-cc.log"
    library = next(built.glob("*.so"))
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> "{log}"\n'
        'out=""; prev=""; portable=0\n'
        'for a in "$@"; do [ "$prev" = "-o" ] && out="$a"; [ "$a" = "-DGMT_NO_CLONES" ] && portable=1; prev="$a"; done\n'
        f'if [ $portable = 0 ]; then {first or ":"}; fi\n'
        f'cp "{library}" "$out"\n'
    )
    script.chmod(0o755)
    return script, log


def libraries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.so"))


# --- a damaged library is rebuilt, never loaded ------------------------------------------------------


def test_a_truncated_library_is_rebuilt_not_loaded(built_kernel, tmp_path):
    """dlopen of a truncated library dies of SIGBUS: the loader checks it against its sidecar first."""
    library = copy_build(built_kernel, tmp_path)
    size = library.stat().st_size
    with open(library, "r+b") as damaged:
        damaged.truncate(200_000)
    done = run_python(LOAD_AND_MASK, tmp_path)
    assert done.returncode == 0, f"returncode {done.returncode}: {done.stderr[-2000:]}"
    assert library.stat().st_size == size and loader._verified(library)


@pytest.mark.parametrize("size", [1_000, 100_000, 400_000])
def test_a_library_shorter_than_its_sidecar_says_fails_verification(built_kernel, tmp_path, size):
    library = copy_build(built_kernel, tmp_path)
    assert loader._verified(library)
    with open(library, "r+b") as damaged:
        damaged.truncate(size)
    assert not loader._verified(library)


def test_a_library_changed_in_place_or_without_sidecar_fails_verification(built_kernel, tmp_path):
    library = copy_build(built_kernel, tmp_path)
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    assert not loader._verified(library)
    shutil.copy2(next(built_kernel.glob("*.so")), library)
    assert loader._verified(library)
    loader._sidecar(library).unlink()
    assert not loader._verified(library)


def test_a_library_without_sidecar_is_rebuilt(built_kernel, fresh_loader, monkeypatch, tmp_path):
    cc, log = fake_compiler(tmp_path, built_kernel)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv(dispatch.ENV, "1")
    dispatch.kernel()
    folder = fresh_loader / "native"
    (library,) = folder.glob("*.so")
    loader._sidecar(library).unlink()
    monkeypatch.setattr(loader, "_libraries", {})
    dispatch.kernel()
    assert len(log.read_text().splitlines()) == 2 and loader._verified(library)


def test_builds_once_into_the_cache(built_kernel, fresh_loader, monkeypatch, tmp_path):
    cc, log = fake_compiler(tmp_path, built_kernel)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setenv(dispatch.ENV, "1")
    assert hasattr(dispatch.kernel(), "gmt_hist_f32")
    folder = fresh_loader / "native"
    (library,) = folder.glob("*.so")
    stamp = library.stat().st_mtime_ns
    monkeypatch.setattr(loader, "_libraries", {})
    dispatch.kernel()
    assert len(log.read_text().splitlines()) == 1 and library.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in folder.iterdir()) == [library.name, library.name + ".sha256"]  # no temporary file


def test_every_function_is_declared_from_the_table_at_load(built_kernel, fresh_loader, monkeypatch):
    copy_build(built_kernel, fresh_loader)
    monkeypatch.setenv(dispatch.ENV, "1")
    lib = dispatch.kernel()
    for name, signature in signatures.SIGNATURES.items():
        function = getattr(lib, name)
        assert tuple(function.argtypes) == signature.argtypes and function.restype is signature.restype, name


def test_concurrent_builds_race_harmlessly(built_kernel, tmp_path):
    """Processes building at once each compile into a temporary file of their own and rename it."""
    cc, log = fake_compiler(tmp_path, built_kernel, first="sleep 1")
    environment = {**os.environ, "GMT_PLUGINS_CACHE": str(tmp_path / "cache"), "GMT_PLUGINS_NATIVE": "1", "CC": str(cc),
                   "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    code = "from gmt_plugins.engine import dispatch\nprint(dispatch.kernel()._name)"
    runs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
            for _ in range(3)]
    results = [run.communicate(timeout=300) + (run.returncode,) for run in runs]
    assert all(code == 0 for _, _, code in results), results
    folder = tmp_path / "cache" / "native"
    (library,) = folder.glob("*.so")
    assert {out.strip() for out, _, _ in results} == {str(library)} and loader._verified(library)
    assert sorted(p.name for p in folder.iterdir()) == [library.name, library.name + ".sha256"]
    assert 1 <= len(log.read_text().splitlines()) <= 3


# --- a failed, killed or interrupted compiler --------------------------------------------------------


@pytest.mark.parametrize(
    "failure, reason",
    [("kill -9 $$", "killed by signal 9"),
     ('echo "cc: fatal error: Killed signal terminated program cc1" >&2; exit 4', "Killed signal terminated program cc1")],
    ids=["signal", "cc1-killed"],
)
def test_a_killed_compiler_leaves_no_library_and_no_portable_build(built_kernel, tmp_path, failure, reason):
    """Killed for memory or by a user, the compiler said nothing about the clones: caching the portable
    build would leave a slower kernel for good. Nothing is cached; the next process builds again."""
    cc, log = fake_compiler(tmp_path, built_kernel, first=failure)
    done = run_python(LOAD_AND_MASK, tmp_path / "cache", CC=str(cc))
    assert done.returncode != 0 and "NativeUnavailable" in done.stderr and reason in done.stderr
    assert "-DGMT_NO_CLONES" not in log.read_text()
    assert libraries(tmp_path / "cache" / "native") == []


def test_a_compiler_that_rejects_the_clones_gets_a_portable_build_announced_once(built_kernel, tmp_path):
    cc, log = fake_compiler(
        tmp_path, built_kernel, first="echo \"error: the call requires 'ifunc', which is not supported by this target\" >&2; exit 1"
    )
    code = (
        "import json, warnings\nfrom gmt_plugins.engine import dispatch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    libs = {dispatch.kernel()._name for _ in range(3)}\n"
        "print(json.dumps([len(libs), [str(w.message) for w in caught if w.category is RuntimeWarning]]))\n"
    )
    first = run_python(code, tmp_path / "cache", CC=str(cc), GMT_PLUGINS_NATIVE="auto")
    assert first.returncode == 0, first.stderr
    count, messages = json.loads(first.stdout)
    assert count == 1 and len(messages) == 1 and "portable" in messages[0] and "slower" in messages[0]
    (portable,) = libraries(tmp_path / "cache" / "native")
    assert portable.endswith("-portable.so")
    builds = len(log.read_text().splitlines())
    second = run_python(code, tmp_path / "cache", CC=str(cc), GMT_PLUGINS_NATIVE="auto")
    assert second.returncode == 0 and "portable" in second.stdout
    assert len(log.read_text().splitlines()) == builds  # the cached portable build serves: no compiler run


def test_a_failing_compiler_is_named_with_its_status_and_message(fresh_loader, monkeypatch, tmp_path):
    false = shutil.which("false")
    monkeypatch.setenv("CC", false)
    monkeypatch.setenv(dispatch.ENV, "1")
    with pytest.raises(loader.NativeUnavailable, match=re.escape(false) + r" .*exited with status 1: \(no message\)"):
        dispatch.kernel()
    noisy = tmp_path / "noisy-cc"
    noisy.write_text("#!/bin/sh\necho 'gmt_kernels.c:1: error: something is wrong' >&2\nexit 3\n")
    noisy.chmod(0o755)
    monkeypatch.setenv("CC", str(noisy))
    with pytest.raises(loader.NativeUnavailable, match="exited with status 3: gmt_kernels.c:1: error: something is wrong"):
        dispatch.kernel()


def test_flags_in_cc_are_split_as_a_shell_would(built_kernel, fresh_loader, monkeypatch, tmp_path):
    cc, log = fake_compiler(tmp_path, built_kernel)
    monkeypatch.setenv("CC", f"{cc} -O2 '-DNAME=two words'")
    monkeypatch.setenv(dispatch.ENV, "1")
    assert dispatch.kernel() is not None
    assert log.read_text().startswith("-O2 -DNAME=two words -O3")


def test_a_compiler_run_past_the_time_limit_is_unavailable_not_a_crash(fresh_loader, monkeypatch):
    def too_slow(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(loader.subprocess, "run", too_slow)
    with pytest.raises(loader.NativeUnavailable, match=f"took longer than {loader.BUILD_TIMEOUT_S} s"):
        loader._build(COMPILER)
    assert list((fresh_loader / "native").iterdir()) == []  # the temporary file is gone


def test_an_interrupted_build_leaves_no_temporary_file(fresh_loader, monkeypatch):
    def interrupted(command, **kwargs):
        Path(command[command.index("-o") + 1]).write_bytes(b"half a library")
        raise KeyboardInterrupt

    monkeypatch.setattr(loader.subprocess, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dispatch.kernel()
    assert list((fresh_loader / "native").iterdir()) == []


def test_stale_temporary_files_are_swept_at_build_time(built_kernel, tmp_path):
    """A process killed mid-build cannot remove its temporary file; the next build does, once it is
    old enough not to be another process's build in progress."""
    folder = tmp_path / "cache" / "native"
    folder.mkdir(mode=0o700, parents=True)
    stale, fresh = folder / ".build-killed.so", folder / ".build-running.so"
    for leftover in (stale, fresh):
        leftover.write_bytes(b"\0" * 1000)
    old = time.time() - 2 * loader.STALE_TEMP_S
    os.utime(stale, (old, old))
    cc, _ = fake_compiler(tmp_path, built_kernel)
    done = run_python(LOAD_AND_MASK, tmp_path / "cache", CC=str(cc))
    assert done.returncode == 0, done.stderr
    assert not stale.exists() and fresh.exists()


# --- the fallback warning ----------------------------------------------------------------------------


def test_the_fallback_warning_names_the_callers_line(fresh_loader, monkeypatch):
    monkeypatch.setenv("CC", "/nonexistent/gmt-cc")
    monkeypatch.setenv(dispatch.ENV, "auto")
    p = torch.nn.Parameter(torch.zeros(3000))
    p.grad = torch.randn(3000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        GradientMasker([("w", p)], mask_ratio=0.25).apply()
    (warning,) = [w for w in caught if w.category is RuntimeWarning]
    assert warning.filename == __file__, warning.filename
    assert "many times slower" in str(warning.message) and "3x" not in str(warning.message)


# --- the cache folder: loaded code must be this user's alone -----------------------------------------


def test_cache_folder_is_created_private(built_kernel):
    assert stat.S_IMODE(built_kernel.stat().st_mode) == 0o700 and list(built_kernel.glob("*.so"))


def test_a_cache_folder_others_can_write_is_refused(fresh_loader, monkeypatch):
    folder = fresh_loader / "native"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    monkeypatch.setenv(dispatch.ENV, "1")
    with pytest.raises(loader.NativeUnavailable, match="writable by other users"):
        dispatch.kernel()
    monkeypatch.setattr(loader, "_libraries", {})
    monkeypatch.setenv(dispatch.ENV, "auto")
    with pytest.warns(RuntimeWarning, match="writable by other users"):
        assert dispatch.kernel() is None  # auto: one warning, then the torch passes


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="needs root to give the file away")
def test_a_library_another_user_owns_is_refused(built_kernel, fresh_loader, monkeypatch):
    os.chown(copy_build(built_kernel, fresh_loader), 65534, 65534)
    monkeypatch.setenv(dispatch.ENV, "1")
    with pytest.raises(loader.NativeUnavailable, match="belongs to uid 65534"):
        dispatch.kernel()


def test_a_library_missing_a_symbol_is_a_load_failure(built_kernel, fresh_loader, monkeypatch):
    copy_build(built_kernel, fresh_loader)
    monkeypatch.setattr(loader, "REQUIRED_SYMBOLS", (*loader.REQUIRED_SYMBOLS, "gmt_no_such_kernel"))
    monkeypatch.setenv(dispatch.ENV, "1")
    with pytest.raises(loader.NativeUnavailable, match="lacks gmt_no_such_kernel"):
        dispatch.kernel()


# --- the signature table against the C sources ------------------------------------------------------

_C_TYPES = {
    "int64_t": ctypes.c_int64, "uint64_t": ctypes.c_uint64, "int32_t": ctypes.c_int32, "uint32_t": ctypes.c_uint32,
    "double": ctypes.c_double, "float": ctypes.c_float, "void": None,
}
_STRUCTS = {"source_t": signatures.Source, "id3_source_t": signatures.Id3Source}


def _ctype(declaration: str) -> type | None:
    """The ctypes type of one C parameter or return type (qualifiers and names dropped)."""
    words = [w for w in re.findall(r"[A-Za-z_][A-Za-z0-9_]*|\*", declaration) if w not in ("const", "restrict", "__restrict")]
    if "*" in words:
        base = words[0]
        return ctypes.POINTER(_STRUCTS[base]) if base in _STRUCTS else ctypes.c_void_p
    return _C_TYPES[words[0]]


def exported_prototypes() -> dict[str, tuple[tuple, type | None]]:
    """Every non-static function the preprocessed sources define: name -> (argtypes, restype)."""
    text = subprocess.run([*COMPILER.split(), "-E", "-P", str(loader.SOURCE)], capture_output=True, text=True, check=True).stdout
    text = re.sub(r"__attribute__\s*\(\((?:[^()]|\([^()]*\))*\)\)", " ", text)
    found = {}
    # a definition starts a line or follows another one's closing brace (MOVES expands to one line)
    for match in re.finditer(r"(?:^|[;}\n])\s*((?:static\s+|inline\s+)*[A-Za-z_]\w*)\s+(gmt_\w+)\s*\(([^)]*)\)\s*\{", text):
        restype, name, params = match.groups()
        if "static" in restype.split():
            continue
        params = params.strip()
        argtypes = () if params in ("", "void") else tuple(_ctype(p) for p in params.split(","))
        found[name] = (argtypes, _ctype(restype))
    return found


def test_the_signature_table_matches_the_c_prototypes():
    prototypes = exported_prototypes()
    assert sorted(prototypes) == sorted(signatures.SIGNATURES) == list(signatures.REQUIRED_SYMBOLS)
    for name, (argtypes, restype) in prototypes.items():
        assert signatures.SIGNATURES[name] == (argtypes, restype), name
