"""Builds the C++ CPU kernels of ``csrc/`` as ``csfm_kernels._C`` (pybind11 and OpenMP, no torch headers).

The extension is optional at run time: where it cannot be compiled the install still
succeeds and ``csfm_kernels`` falls back to its reference path with one warning.
Set ``CSFM_REQUIRE_EXT=1`` to make a failed build an error (CI does), and
``CSFM_NATIVE=0`` to build without ``-march=native``.
"""
import importlib.util
import os
import sys
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent
SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))


def _source_hash() -> str:
    """csfm_kernels/_source_hash.py, loaded by path: the package is not importable yet."""
    spec = importlib.util.spec_from_file_location("_source_hash", ROOT / "csfm_kernels" / "_source_hash.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_hash(ROOT / "csrc")


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no OpenMP: retry with std::threads; no compiler: python path
            if OPENMP in ext.extra_compile_args:
                print(f"WARNING: building csfm_kernels._C with {OPENMP} failed ({exc}); "
                      "retrying without it (kernels then start their own threads)", file=sys.stderr)
                ext.extra_compile_args.remove(OPENMP)
                ext.extra_link_args.remove(OPENMP)
                self.run()
                return
            if os.environ.get("CSFM_REQUIRE_EXT") == "1":
                raise
            print(f"WARNING: csfm_kernels._C was not built ({exc}); the reference path will be used",
                  file=sys.stderr)


# OpenMP: the kernels then run on torch's own worker threads (csrc/parallel.h).
OPENMP = "-fopenmp"
compile_args = ["-O3", "-std=c++17", "-ffp-contract=fast", OPENMP]
if os.environ.get("CSFM_NATIVE", "1") == "1":
    compile_args.append("-march=native")

ext = Pybind11Extension(
    "csfm_kernels._C",
    SOURCES,
    extra_compile_args=compile_args,
    extra_link_args=[OPENMP],
    define_macros=[("CSFM_SOURCE_HASH", f'"{_source_hash()}"')],
    cxx_std=17,
)

setup(ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt})
