"""Build Parley's C kernels (app/csrc) into one shared library, app/_kernels*.so, when the package is installed.

The metadata lives in pyproject.toml; this file only adds the library. It is loaded with ctypes (it is not a
Python extension module) and holds every kernel three times, for AVX-512, AVX2+FMA and a portable baseline,
with a dispatcher that picks by CPU at load (app/csrc/dispatch.c). So no `-march=native`: one build runs on
any x86-64 (and, portable variant only, on arm64).

The build is optional: without a C compiler (or if it fails) the package still installs, the compiler's
output and a note saying what to install are printed, and Parley runs on plain MLX (slower on the CPU).
`scripts/setup` re-runs a failed build in the open so its errors are seen (pip -q hides them).
Objects are compiled with -ffast-math but the library is linked without it: linking with it pulls in
crtfastmath.o, whose constructor would turn on flush-to-zero for the whole process.
"""

import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

CSRC = "app/csrc"
KERNELS = Extension(
    "app._kernels",
    sources=[f"{CSRC}/{name}.c" for name in ("dispatch", "threads", "variant_avx512", "variant_avx2",
                                                          "variant_portable")],
    depends=[f"{CSRC}/{name}" for name in ("kernels.h", "kernels.inc", "system.h", "quant_rows.h", "kv_codes.h", "attention.c",
                                            "activations.c", "qgemv.c", "kv_decode.c", "q4_attention.c", "q4_attention_rows.c", "threads.h",
                                            "decode_step.c", "crc32.c", "prefill_attention.c", "dequant.c")],
    include_dirs=[CSRC],
    extra_compile_args=["-O3", "-ffast-math", "-fopenmp-simd", "-std=gnu11"],
    libraries=["m", "pthread"],
)
NOTE = ("parley: the C kernels were not built ({}). Parley still works, on plain MLX (2-3x slower on the CPU). "
        "Install a C compiler (Debian/Ubuntu: sudo apt-get install gcc libc6-dev) and reinstall "
        "(scripts/setup, or pip install -e .).")


class OptionalKernels(build_ext):
    """build_ext that reports a failed kernel build instead of failing the install."""

    def run(self):
        try:
            super().run()
        except Exception as e:  # no compiler at all: distutils raises before compiling anything
            self._report(e)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as e:  # the compiler's own messages went to stderr above this note
            self._report(e)

    reported = False

    def _report(self, error: Exception) -> None:
        if not OptionalKernels.reported:  # once: an editable install then also fails to copy the missing library
            OptionalKernels.reported = True
            print(NOTE.format(str(error).strip() or type(error).__name__), file=sys.stderr)


setup(
    ext_modules=[KERNELS] if sys.platform.startswith("linux") else [],
    cmdclass={"build_ext": OptionalKernels},
)
