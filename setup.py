"""Builds fastdiff._C: the C++ CPU kernels always, the CUDA kernels when torch is a CUDA build and nvcc is found.

Environment:
  FASTDIFF_BUILD_CUDA=0/1   force the CUDA half off/on (default: on when torch.version.cuda and nvcc exist)
  FASTDIFF_CUDA_ARCHS       e.g. "8.0;9.0+PTX" (default: the visible GPU's arch, else "8.0;9.0+PTX")
  FASTDIFF_CPU_FLAGS        extra flags for the C++ kernels (default: AVX2/FMA/F16C when this CPU has them)
  FASTDIFF_DEBUG=1          -O0 -g, and nvcc -lineinfo
"""
import glob
import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension fixes CUDA_HOME when it is imported: from $CUDA_HOME, else `which nvcc`, else
# /usr/local/cuda. With nvcc on PATH through a symlink it can settle on /usr/local (no lib64/libcudart there),
# so point it at the real toolkit first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.lower() not in ("0", "false", "no", "off")


def _cpu_flags():
    env = os.environ.get("FASTDIFF_CPU_FLAGS")
    if env is not None:
        return env.split()
    flags = []
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        feats = set(info.split())
        for feat, flag in (("avx2", "-mavx2"), ("fma", "-mfma"), ("f16c", "-mf16c")):
            if feat in feats:
                flags.append(flag)
        if {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= feats:
            # 512-bit vectors: the SiLU's exp and division are compute-bound (2x over AVX2 measured here)
            flags += ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mprefer-vector-width=512"]
            if "avx512_bf16" in feats:  # one-instruction fp32 -> bf16 rounding (csrc/cpu/vec.h)
                flags.append("-mavx512bf16")
    except OSError:
        pass
    return flags


def _cuda_archs(torch):
    env = os.environ.get("FASTDIFF_CUDA_ARCHS")
    if env:
        return env
    try:
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            suffix = "a" if major == 9 else ""
            return f"{major}.{minor}{suffix}+PTX"
    except Exception:
        pass
    # no GPU to ask: SASS for sm_80 (runs on every 8.x GPU) and sm_90, and compute_90 PTX that the driver JITs for
    # newer GPUs (Blackwell). No kernel uses an sm_90a-only instruction, and 9.0a PTX would run on sm_90 only.
    return "8.0;9.0+PTX"


def _extensions():
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    debug = bool(_flag("FASTDIFF_DEBUG"))
    force = _flag("FASTDIFF_BUILD_CUDA")
    has_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    build_cuda = (torch.version.cuda is not None and has_nvcc) if force is None else force
    if build_cuda and (torch.version.cuda is None or not has_nvcc):
        sys.exit("FASTDIFF_BUILD_CUDA=1 but torch is not a CUDA build or nvcc was not found (set CUDA_HOME)")

    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = opt + ["-fopenmp", "-fno-trapping-math"] + _cpu_flags()
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(HERE, "csrc")]
    define_macros = []

    if not build_cuda:
        print("fastdiff: building the CPU extension only", file=sys.stderr)
        return [CppExtension("fastdiff._C", sources, include_dirs=include_dirs, extra_link_args=["-fopenmp"],
                             extra_compile_args={"cxx": cxx}, define_macros=define_macros)]

    # torch's CUDA headers include cuBLAS/cuSPARSE headers that pip wheels ship under nvidia/cu*/include.
    for d in glob.glob(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu*", "include")):
        include_dirs.append(d)
    archs = _cuda_archs(torch)
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    print(f"fastdiff: building CPU + CUDA kernels for archs {archs}", file=sys.stderr)
    nvcc = opt + ["--expt-relaxed-constexpr", "-Xptxas=-warn-spills",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__"]
    if debug:
        nvcc.append("-lineinfo")
    if _flag("FASTDIFF_PTXAS_VERBOSE"):
        nvcc.append("-Xptxas=-v")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    return [CUDAExtension("fastdiff._C", sources, include_dirs=include_dirs,
                          define_macros=define_macros + [("FASTDIFF_WITH_CUDA", None)],
                          extra_link_args=["-fopenmp"], extra_compile_args={"cxx": cxx, "nvcc": nvcc})]


def main():
    from torch.utils.cpp_extension import BuildExtension

    os.environ.setdefault("MAX_JOBS", str(max(1, os.cpu_count() or 1)))
    setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)})


if __name__ == "__main__":
    main()
