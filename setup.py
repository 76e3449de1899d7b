"""Build of the optional C++/CUDA extension ``deltacomp._C`` (package metadata lives in pyproject.toml).

    pip install --no-build-isolation -e .       # builds against the torch already installed

- CPU kernels (csrc/ops.cpp + csrc/cpu/*.cpp) always, with -O3 and OpenMP (GCC's -fopenmp / libgomp).
  DELTACOMP_OPENMP=0 builds them without OpenMP (single-threaded kernels, every `omp` pragma ignored); that
  is the default on macOS, whose Apple clang has no -fopenmp (DELTACOMP_OPENMP=1 there asks for it, for a
  compiler that has it).
- CUDA kernels (csrc/cuda/*.cu, torch-free bodies, + csrc/cuda/cuda_ops.cpp, their torch wrappers) only
  when the installed torch is a CUDA build and CUDA_HOME exists; architectures from TORCH_CUDA_ARCH_LIST,
  default sm_90. (tests/test_cuda_build.py compiles every .cu file with plain nvcc, GPU or not.)
- DELTACOMP_NO_EXT=1 skips the extension. A failed compile is reported and the install goes on
  without it (deltacomp then uses its pure-torch ops and says so once); DELTACOMP_REQUIRE_EXT=1 makes
  a failed compile fatal instead.
"""
import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    # setuptools wants source paths relative to setup.py
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _flag(name, default="0"):
    """A build switch: "0" or "1" (unset or empty: ``default``); anything else stops the build in one line."""
    value = os.environ.get(name, "").strip() or default
    if value not in ("0", "1"):
        sys.exit(f"deltacomp: environment variable {name}={os.environ[name]!r}: expected 0 or 1, or unset")
    return value == "1"


def _extensions():
    require = _flag("DELTACOMP_REQUIRE_EXT")
    if _flag("DELTACOMP_NO_EXT"):
        print("deltacomp: DELTACOMP_NO_EXT=1, not building the C++ extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:  # no torch: nothing to build against
        print(f"deltacomp: torch not importable ({exc}); not building the C++ extension. Install torch "
              "first, then `pip install --no-build-isolation -e .`", file=sys.stderr)
        return [], {}

    sources = _rel("csrc/*.cpp") + _rel("csrc/cpu/*.cpp")  # ops.cpp: schemas, plans.cpp: module init
    openmp = _flag("DELTACOMP_OPENMP", "0" if sys.platform == "darwin" else "1")
    cxx = ["-O3", "-fopenmp"] if openmp else ["-O3", "-Wno-unknown-pragmas"]  # torch adds the C++ standard
    link = ["-lgomp"] if openmp else []
    if not openmp:
        print("deltacomp: building the C++ extension without OpenMP (single-threaded CPU kernels)", file=sys.stderr)
    cuda_sources = _rel("csrc/cuda/*.cu") + _rel("csrc/cuda/*.cpp")
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
    if use_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # honoured by torch's build helper
        ext = CUDAExtension(
            "deltacomp._C", sources + cuda_sources,
            extra_compile_args={"cxx": cxx + ["-DDELTACOMP_WITH_CUDA"],
                                "nvcc": ["-O3", "-DDELTACOMP_WITH_CUDA", "--use_fast_math"]},
            extra_link_args=link)
    else:
        ext = CppExtension("deltacomp._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class OptionalBuildExtension(BuildExtension):
        """Reports a failed compile and goes on, so the package still installs (pure-torch ops)."""

        def run(self):  # run(), not build_extension(): torch's compiler checks fail before that
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - any compiler/linker/toolchain failure
                if require:
                    raise
                print(f"\n*** deltacomp: building deltacomp._C failed ({type(exc).__name__}: {exc}); "
                      "installing without it. Set DELTACOMP_REQUIRE_EXT=1 to make this an error.\n",
                      file=sys.stderr)

    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
