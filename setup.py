"""Builds the compiled extension ``d2v_fast._C`` from ``csrc/``.

The C++ (CPU) sources are always built. ``*.cu`` sources are added only when a CUDA
toolkit is found and the installed torch is a CUDA build; set ``D2V_FAST_CPU_ONLY=1``
to skip them anyway.
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:  # pragma: no cover - exercised only on a machine without torch
    sys.exit(
        "error: building d2v_fast needs torch installed first. Install torch "
        "(`pip install torch`), then `pip install --no-build-isolation -e .` "
        "so the extension is built against that torch."
    )

HERE = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
cuda_sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cu")))

with_cuda = (
    bool(cuda_sources)
    and torch.version.cuda is not None
    and CUDA_HOME is not None
    and os.environ.get("D2V_FAST_CPU_ONLY", "0") != "1"
)

cxx_flags = ["-O3"]  # the C++ standard is the one torch asks for
# Find libc10/libtorch next to the torch we build against, so `import d2v_fast._C` works
# even before `import torch` has loaded them.
link_flags = [f"-Wl,-rpath,{os.path.join(os.path.dirname(torch.__file__), 'lib')}"]
define_macros = []
if with_cuda:
    define_macros.append(("D2V_WITH_CUDA", None))
    ext = CUDAExtension(
        "d2v_fast._C",
        cpp_sources + cuda_sources,
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
        extra_link_args=link_flags,
        define_macros=define_macros,
    )
else:
    ext = CppExtension("d2v_fast._C", cpp_sources, extra_compile_args={"cxx": cxx_flags},
                       extra_link_args=link_flags)

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
