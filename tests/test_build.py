"""The installation: which backends exist, and that CI loads the extension it just built."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import csfm_kernels
from csfm_kernels import _ext
from csfm_kernels._source_hash import source_hash

ROOT = Path(__file__).resolve().parents[1]


def test_build_info_names_every_backend_with_a_reason():
    info = csfm_kernels.build_info()
    names = [b.name for b in info.backends]
    assert names == ["cpp_cpu", "triton_gpu", "triton_interpreter", "flash_attn"]
    for backend in info.backends:
        assert backend.detail, backend.name
    assert info["cpp_cpu"].available == (_ext.cpp is not None)
    assert "cpp_cpu" in str(info)


@pytest.mark.skipif(os.environ.get("CSFM_REQUIRE_EXT") != "1" and _ext.cpp is None,
                    reason="extension not built and CSFM_REQUIRE_EXT is not 1")
def test_loaded_extension_is_built_from_these_sources():
    """CI sets CSFM_REQUIRE_EXT=1: the extension must load, from this checkout, and be current."""
    assert _ext.cpp is not None, _ext.cpp_error
    assert Path(_ext.cpp.__file__).resolve().parent == ROOT / "csfm_kernels"
    assert _ext.cpp.source_hash() == source_hash(ROOT / "csrc"), \
        "the loaded csfm_kernels._C was built from other sources: rerun pip install -e ."


def test_import_without_extension_warns_once_and_falls_back():
    script = """
import sys, warnings, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "csfm_kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, csfm_kernels
    from csfm_kernels._dispatch import resolve
    assert resolve("patch_embed", "auto", torch.device("cpu"), torch.float32) == "reference"
    print(csfm_kernels.build_info())
mine = [w for w in caught if "csfm_kernels" in str(w.message)]
assert len(mine) == 1, [str(w.message) for w in caught]
print("WARNING:", mine[0].message)
"""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "C++ CPU kernels are not built" in done.stdout
    assert "cpp_cpu" in done.stdout and "blocked for the test" in done.stdout


@pytest.mark.skipif(_ext.cpp is None or not Path("/proc/self/maps").exists(),
                    reason="needs the built extension and Linux's /proc/self/maps")
def test_extension_runs_on_torchs_openmp_runtime():
    """Built with OpenMP, the extension must bind to the libgomp torch loaded (one pool of worker
    threads in the process), not load a second OpenMP runtime beside it."""
    script = """
import torch, csfm_kernels._C
from pathlib import Path
maps = {line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line}
print(sorted(Path(p).resolve() for p in maps))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.count("libgomp") <= 1, f"more than one OpenMP runtime loaded: {out}"
