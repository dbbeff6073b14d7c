"""Build cuemu: the CUDA kernels of csrc/cuda, as written, compiled for the CPU with g++ (see cuemu.h).

`load()` rewrites each .cu file mechanically (the rewrites are counted: a source that no longer matches what
they expect fails the build instead of silently testing less), compiles them with the fiber runtime into one
Python extension, and returns it. Its ops are `torch.ops.fastdiff_emu.<op>`, with the schemas of
`torch.ops.fastdiff.<op>` (so `fastdiff._C` must be built), and they take CPU tensors.

Environment: FASTDIFF_CUEMU_ASAN=1 builds with -fsanitize=address (run the process with libasan preloaded).
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# the .cu files that run here, and the CPU files whose shared host code (argument checks) they call
CUDA_SOURCES = ["csrc/cuda/group_norm.cu", "csrc/cuda/sampler_step.cu", "csrc/cuda/attention.cu"]
HOST_SOURCES = ["csrc/cpu/sampler_step.cpp"]
SELFTEST = "tests/cuemu/selftest.cu"  # kernels with planted bugs the emulator must catch
OPS = ["group_norm", "group_norm_backward", "sampler_step", "attention"]

# The PTX the kernels issue through asm(): opcode -> the emulator's call, given the statement's operands in order
# (outputs first, as in the constraint lists). A statement with another opcode fails the build.
ASM = [
    ("st.global.v4.b32", lambda o: f"::cuemu::st_global_v4_b32({', '.join(o)});"),
    ("cp.async.cg.shared.global", lambda o: f"::cuemu::cp_async_cg_16({', '.join(o)});"),
    ("cp.async.commit_group", lambda o: "::cuemu::cp_async_commit();"),
    ("cp.async.wait_group", lambda o: f"::cuemu::cp_async_wait({o[0]});"),
    ("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16", lambda o: f"::cuemu::ldmatrix_x4({', '.join(o)}, true);"),
    ("ldmatrix.sync.aligned.m8n8.x4.shared.b16", lambda o: f"::cuemu::ldmatrix_x4({', '.join(o)}, false);"),
    ("ex2.approx.ftz.f32", lambda o: f"{o[0]} = ::cuemu::ex2_approx_ftz({o[1]});"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32",
     lambda o: f"::cuemu::mma_m16n8k16<false>({', '.join(o)});"),
    ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32",
     lambda o: f"::cuemu::mma_m16n8k16<true>({', '.join(o)});"),
]


def _rewrite_asm(m):
    stmt = m.group(0)
    operands = re.findall(r'"[=+]?[a-z]"\(([^()]*(?:\([^()]*\))?[^()]*)\)', stmt)
    for opcode, make in ASM:
        if re.search(re.escape(opcode) + r"\b(?![.\w])", stmt):
            return make(operands)
    raise RewriteError(f"cuemu: inline PTX that cuemu.h does not model: {stmt[:120]}")


class RewriteError(RuntimeError):
    pass


def _sub(pattern, repl, text, *, name, expect_min=1, flags=0):
    out, n = re.subn(pattern, repl, text, flags=flags)
    if n < expect_min:
        raise RewriteError(f"cuemu: the rewrite '{name}' matched {n} times (expected >= {expect_min})")
    return out


def rewrite_cuda(text: str, path: str, *, registers: bool = True) -> str:
    """The .cu source as C++ for g++ with cuemu.h (local cuda/*.cuh includes rewritten in place)."""
    def inline_include(m):
        rel = "csrc/" + m.group(1)
        return f'#line 1 "{rel}"\n' + _rewrite_device((ROOT / rel).read_text(), rel) + f'\n#line 1 "{path}"\n'

    text = re.sub(r'#include "(cuda/[\w.]+\.cuh)"', inline_include, text)
    text = _rewrite_device(text, path)
    text = _sub(r"#include <(ATen/cuda/[^>]+|c10/cuda/[^>]+|cuda_fp16\.h|cuda_bf16\.h|cuda_runtime\.h)>",
                   r"// (cuemu) \g<0>", text, name="CUDA includes", expect_min=0)
    # launches: NAME<<<cfg>>>(args) -> ::cuemu::Launch(cfg).run(NAME, args)
    text = _sub(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", r"::cuemu::Launch(\2).run(\1, ",
                   text, name="launches", flags=re.S)
    if "<<<" in text:
        raise RewriteError(f"cuemu: a launch in {path} was not rewritten")
    text = _sub(r"\bat::empty_like\(", "::cuemu::empty_like(", text, name="empty_like", expect_min=0)
    text = _sub(r"\bat::empty\(", "::cuemu::empty(", text, name="empty", expect_min=0)
    # host code: the emulated device is the CPU
    text = _sub(r"\b(\w+)\.is_cuda\(\)", r"::cuemu::on_device(\1)", text, name="is_cuda", expect_min=0)
    text = _sub(r"\b(\w+)\.get_device\(\)", r"::cuemu::device_index(\1)", text, name="get_device",
                   expect_min=0)
    text = _sub(r"TORCH_LIBRARY_IMPL\(fastdiff,\s*CUDA,", "TORCH_LIBRARY_IMPL(fastdiff_emu, CPU,", text,
                   name="registration", expect_min=1 if registers else 0)
    return f'#include "cuemu.h"\n#line 1 "{path}"\n' + text


def _rewrite_device(text: str, path: str) -> str:
    # vector accesses through a pointer cast: checked for alignment
    text = _sub(r"\*reinterpret_cast<((?:const\s+)?[\w:]+(?:<[\w:]+>)?)\s*\*>\(", r"*::cuemu::vptr<\1>(", text,
                   name="vector casts", expect_min=0)
    text = re.sub(r'\basm\s*(?:volatile\s*)?\((?:"(?:[^"\\]|\\.)*"|[^;"])*?\);', _rewrite_asm, text)
    if re.search(r"\basm\s*(volatile\s*)?\(", text):
        raise RewriteError(f"cuemu: {path} has inline PTX that was not rewritten")
    # dynamic shared memory: the launch's buffer
    text = _sub(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]*?\w)\s+(\w+)\[\];",
                   r"\1* \2 = reinterpret_cast<\1*>(::cuemu::dyn_smem());", text, name="extern shared",
                   expect_min=0)
    return text


def rewrite_host(text: str, path: str) -> str:
    """A CPU source compiled only for the helpers it shares with the CUDA files: its registrations removed."""
    text = _sub(r"TORCH_LIBRARY_IMPL\(fastdiff,\s*CPU,\s*m\)\s*\{[^{}]*\}", "", text, name="CPU registration")
    return f'#line 1 "{path}"\n' + text


def _define_schemas():
    import torch

    import fastdiff  # noqa: F401  (loads fastdiff._C: the schemas)

    if getattr(_define_schemas, "lib", None) is not None:
        return
    lib = torch.library.Library("fastdiff_emu", "DEF")
    for op in OPS:
        schema = str(getattr(torch.ops.fastdiff, op).default._schema)
        lib.define(schema.split("::", 1)[1])
    _define_schemas.lib = lib


_MODULE = None


def cuda_include_dir():
    """The CUDA toolkit's include folder (the host-side fp16/bf16 headers), or None."""
    import torch.utils.cpp_extension as ce

    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda", ce.CUDA_HOME):
        if home and (Path(home) / "include" / "cuda_fp16.h").exists():
            return str(Path(home) / "include")
    return None


def load(verbose: bool = False):
    """Build (cached by content) and import the emulator; returns the module (configure, stats)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    import torch.utils.cpp_extension as ce

    asan = os.environ.get("FASTDIFF_CUEMU_ASAN") == "1"
    gen = ROOT / "build" / ("cuemu-asan" if asan else "cuemu")
    gen.mkdir(parents=True, exist_ok=True)
    srcs = [str(HERE / "module.cpp")]
    for rel in CUDA_SOURCES + HOST_SOURCES + [SELFTEST]:
        text = (ROOT / rel).read_text()
        if rel.endswith(".cu"):
            out = rewrite_cuda(text, rel, registers=rel != SELFTEST)
        else:
            out = rewrite_host(text, rel)
        dst = gen / (Path(rel).stem + ("_cu.cpp" if rel.endswith(".cu") else "_host.cpp"))
        if not dst.exists() or dst.read_text() != out:
            dst.write_text(out)
        srcs.append(str(dst))
    cuda_inc = cuda_include_dir()
    if cuda_inc is None:
        raise FileNotFoundError("cuemu needs the CUDA headers (cuda_fp16.h): set CUDA_HOME")
    inc = [str(ROOT / "csrc"), str(HERE), cuda_inc]
    flags = ["-O1", "-g0", "-std=c++20", "-Wno-unknown-pragmas", "-fno-strict-aliasing"]
    if asan:
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    deps = srcs + [str(HERE / "cuemu.h")] + sorted(str(p) for p in (ROOT / "csrc" / "common").glob("*.h"))
    digest = hashlib.sha1("".join(Path(s).read_text() for s in deps).encode() + str(flags).encode()).hexdigest()[:8]
    _define_schemas()
    _MODULE = ce.load(name=f"fastdiff_cuemu_{'asan_' if asan else ''}{digest}", sources=srcs,
                      extra_include_paths=inc, extra_cflags=flags,
                      extra_ldflags=["-fsanitize=address"] if asan else [], build_directory=str(gen),
                      verbose=verbose)
    return _MODULE


if __name__ == "__main__":
    m = load(verbose="-v" in sys.argv)
    print("cuemu built:", m.__file__)
