"""Builds falcon_ext._C: every op's CPU reference always, the CUDA kernels when possible.

FALCON_EXT_CUDA=1 demands the CUDA kernels (error if torch is a CPU build or nvcc is missing),
FALCON_EXT_CUDA=0 skips them; unset, they are built whenever torch is a CUDA build and a CUDA
toolkit is found, with or without a visible GPU (so CI compiles them on a GPU-less machine).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def find_cuda_home():
    """The toolkit root holding bin/nvcc and lib64/libcudart.so.

    torch guesses CUDA_HOME as two levels above `which nvcc`, which is wrong when nvcc on PATH
    is a wrapper script (e.g. /usr/local/bin/nvcc), so we look for the real root ourselves.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and glob.glob(
            os.path.join(root, "lib*", "libcudart.so*")
        ):
            return root
    return None


def want_cuda(torch_has_cuda, cuda_home):
    flag = os.environ.get("FALCON_EXT_CUDA", "").strip()
    if flag not in ("", "0", "1"):
        sys.exit(f"FALCON_EXT_CUDA must be 0, 1 or unset, got {flag!r}")
    if flag == "0":
        return False
    if flag == "1":
        if not torch_has_cuda:
            sys.exit("FALCON_EXT_CUDA=1 but the installed torch is a CPU-only build; "
                     "install a CUDA build of torch (e.g. torch==2.14.1) or set FALCON_EXT_CUDA=0")
        if cuda_home is None:
            sys.exit("FALCON_EXT_CUDA=1 but no CUDA toolkit (bin/nvcc + lib64/libcudart.so) was found; "
                     "set CUDA_HOME to the toolkit root or set FALCON_EXT_CUDA=0")
        return True
    return torch_has_cuda and cuda_home is not None


def extension():
    cuda_home = find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # must precede the cpp_extension import
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    use_cuda = want_cuda(torch.version.cuda is not None, cuda_home)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    debug = os.environ.get("FALCON_EXT_DEBUG") == "1"
    # -fopenmp: torch is an OpenMP build, and at::parallel_for's inline body is an OpenMP pragma,
    # which without the flag compiles to a serial loop (csrc/int8_linear.cpp splits rows with it).
    cxx = (["-O0", "-g"] if debug else ["-O3"]) + ["-fopenmp"]
    link = ["-fopenmp"]
    if not use_cuda:
        print("falcon_ext: building the CPU ops only", file=sys.stderr)
        return CppExtension("falcon_ext._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # No GPU to query: build for A100 and H100 (nvcc 13 rejects sm_70 and older).
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    include_dirs = []
    # ATen/cuda headers pull cusparse.h etc., which a bare system toolkit may lack; the
    # nvidia wheels that torch depends on ship them.
    for site in sys.path:
        wheel_include = os.path.join(site, "nvidia", "cu13", "include")
        if os.path.isdir(wheel_include):
            include_dirs.append(wheel_include)
            break
    sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
    print(f"falcon_ext: building CPU + CUDA ops (CUDA_HOME={cuda_home}, "
          f"arch={os.environ.get('TORCH_CUDA_ARCH_LIST', 'visible GPU')})", file=sys.stderr)
    return CUDAExtension(
        "falcon_ext._C",
        sources,
        include_dirs=include_dirs,
        define_macros=[("FALCON_EXT_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx, "nvcc": (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["-lineinfo"]},
        extra_link_args=link,
    )


def main():
    ext = extension()  # sets CUDA_HOME before cpp_extension is first imported
    from torch.utils.cpp_extension import BuildExtension

    setup(
        packages=find_packages(include=["falcon_ext", "falcon_ext.*"]),
        ext_modules=[ext],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
