#!/usr/bin/env python3
"""Compiles every CUDA kernel body in kernels/cuda/ with NVRTC, as MLX 0.32.2's cuda_kernel would,
without a GPU (nvrtcCompileProgram needs no device). Normally run through
scripts/check_cuda_kernels.sh, which fetches the compiler and the headers from PyPI wheels.

How MLX 0.32.2 builds and compiles a `cuda_kernel` (mlx/backend/cuda/custom_kernel.cpp
build_kernel, mlx/backend/cuda/jit_module.cpp compile; the literals below are checked against the
wheel's libmlx.so when it is prepared, so a changed MLX fails loudly instead of drifting):
  - source = default header (utils.cuh + <cooperative_groups.h>) + the kernel's header +
    `namespace mlx::core::cu {` + `namespace cg = cooperative_groups;` + a generated
    `__global__ void custom_kernel_<name><hash>(...)`: per input `const <T>* name` plus
    `<name>_shape` (Shape), `_strides` (Strides), `_ndim` (int) where the body mentions them
    (inputs of ndim > 0), per output `<T>* name`; then one line per template argument, in the
    order given (`constexpr int`, `constexpr bool`, `using`), then the body.
  - NVRTC: MLX's 17 device headers (mlx/backend/cuda/device/*) are passed in memory (bytes
    embedded in libmlx.so, extracted here); options `--device-as-default-execution-space`,
    `--gpu-architecture=sm_<cc>a` (cc >= 9), `--include-path=` <wheel mlx>/include,
    <wheel mlx>/include/cccl, <site-packages>/nvidia/cu13/include; the kernel is registered as
    the name expression `mlx::core::cu::custom_kernel_<name><hash>`.

Which kernels exist (name, inputs, outputs, body file, header) is read from the Rust sources
(`static …: GpuKernel = GpuKernel { … }` with a kernels/cuda body); the template instantiations
zmlx launches (from the `.apply(` call sites) are in INSTANCES below. A kernel without an entry
there, or whose input names changed, fails the check.

Exit status: 0 all compiled, 1 a body failed to compile (or the self-check failed), 2 setup
problem (missing compiler/headers, unparsable sources).
"""
import argparse
import ctypes
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------ MLX 0.32.2 rules (custom_kernel.cpp)
DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
NS_OPEN = "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
NS_CLOSE = "\n}\n\n} // namespace mlx::core::cu\n"
CUDA_TYPE = {  # dtype_to_cuda_type (mlx/backend/cuda/utils.cpp)
    "bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
    "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
    "float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
}
HASH_TYPE = {  # get_type_string (mlx/backend/common/compiled.cpp), used in the kernel name
    "bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
    "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
    "float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float", "float64": "double",
}
NVRTC_FIXED_OPTIONS = ["--device-as-default-execution-space"]
# Byte strings MLX uses to build the source and call NVRTC: each must occur in libmlx.so.
MLX_LITERALS = [
    DEFAULT_HEADER + "\0", NS_OPEN, NS_CLOSE, "__global__ void ", "custom_kernel_", "mlx::core::cu::",
    "    const __grid_constant__ Shape ", "    const __grid_constant__ Strides ",
    "    const __grid_constant__ int ", "_shape,\n", "_strides,\n", "_ndim,\n",
    "  constexpr int {} = {};\n", "  constexpr bool {} = {};\n", "  using {} = {};\n",
    "--device-as-default-execution-space", "--gpu-architecture={}_{}{}{}", "--include-path={}",
    "__nv_bfloat16\0", "__half\0",
]
DEVICE_PREFIX = b"mlx/backend/cuda/device/"


def build_function(func_name, body, inputs, outputs, template):
    """The generated `__global__` function: inputs/outputs [(name, dtype)], template
    [(name, dtype-name | int | bool)] in the order zmlx passes them."""
    s = "__global__ void " + func_name + "(\n"
    for name, dt in inputs:  # every zmlx input has ndim > 0
        s += "    const " + CUDA_TYPE[dt] + "* " + name + ",\n"
        if name + "_shape" in body:
            s += "    const __grid_constant__ Shape " + name + "_shape,\n"
        if name + "_strides" in body:
            s += "    const __grid_constant__ Strides " + name + "_strides,\n"
        if name + "_ndim" in body:
            s += "    const __grid_constant__ int " + name + "_ndim,\n"
    for i, (name, dt) in enumerate(outputs):
        s += "    " + CUDA_TYPE[dt] + "* " + name + (",\n" if i < len(outputs) - 1 else ") {\n")
    for name, v in template:
        if isinstance(v, bool):
            s += "  constexpr bool %s = %s;\n" % (name, "true" if v else "false")
        elif isinstance(v, int):
            s += "  constexpr int %s = %d;\n" % (name, v)
        else:
            s += "  using %s = %s;\n" % (name, CUDA_TYPE[v])
    if template:
        s += "\n"
    return s + body


def build_source(header, functions):
    """MLX's full source for one kernel (one function); with several functions (the batched
    mode) the namespace block is repeated per function, the includes appear once."""
    return DEFAULT_HEADER + header + "".join(NS_OPEN + f + NS_CLOSE for f in functions)


def kernel_name(name, template):
    h = ""
    for _, v in template:
        h += ("_t" if v else "_f") if isinstance(v, bool) else "_%d" % v if isinstance(v, int) else "_" + HASH_TYPE[v]
    return "custom_kernel_" + name + h


# ------------------------------------------------------------ the instantiations zmlx launches
F32, F16, BF16 = "float32", "float16", "bfloat16"
FLOATS = (F32, F16, BF16)
ITEM = {F32: 4, F16: 2, BF16: 2}


def cuda_block_dim(threads):  # src/kernels/mod.rs
    bd = 32
    while bd < threads and bd < 1024:
        bd *= 2
    return bd


def router_args(t, e, k, kind, norm):  # src/kernels/mod.rs moe_router (CUDA branch)
    nr = 16 // ITEM[t]
    n = k if kind == 0 else e
    return [("T", t), ("E", e), ("K", k), ("KIND", kind), ("NORM", norm),
            ("BD", cuda_block_dim((n + nr - 1) // nr)), ("NR", nr)]


def instances():
    """{body file: (input dtypes, output dtypes, [template args])}: dtype "T"/"O" = that template arg."""
    k = {}
    k["swiglu.cu"] = ({"gate": "T", "up": "T"}, {"out": "T"}, [[("T", t)] for t in FLOATS])
    # moe_combine: T, K, D, MODE (0 act, 1 f32, 2 f32_no_fma), ACC (0 in T, 1 float sum for half
    # types, 2 warp-tree probe, CUDA only, K <= 32).
    mc = []
    for t in FLOATS:
        for mode, acc in [(0, 0), (1, 0), (2, 0), (0, 2)] + ([(0, 1)] if t != F32 else []):
            kk, d = (2, 4096) if t == F32 else (8, 2048)
            mc.append([("T", t), ("K", kk), ("D", d), ("MODE", mode), ("ACC", acc)])
    k["moe_combine.cu"] = ({"y": "T", "w": "T"}, {"out": "T"}, mc)
    # moe_router: Mixtral (KIND 0), Qwen3 (1, norm or not), Qwen2 (2), a wide one (BD 128).
    mr = []
    for t in FLOATS:
        mr += [router_args(t, 8, 2, 0, False), router_args(t, 128, 8, 1, True), router_args(t, 60, 4, 2, False)]
    mr += [router_args(F32, 128, 8, 1, False), router_args(F32, 512, 10, 1, True), router_args(BF16, 256, 64, 1, True)]
    k["moe_router.cu"] = ({"logits": "T"}, {"indices": "uint32", "weights": "T"}, mr)
    # sigmoid_router: T, E, K, NG, TG, NORM, HAS_EPS (DeepSeek-V3, GLM-4.7-Flash, GLM-4.5, Kimi-K2).
    sr = []
    for t in FLOATS:
        sr += [[("T", t), ("E", 256), ("K", 8), ("NG", 8), ("TG", 4), ("NORM", True), ("HAS_EPS", False)],
               [("T", t), ("E", 64), ("K", 4), ("NG", 1), ("TG", 1), ("NORM", True), ("HAS_EPS", True)]]
    sr += [[("T", BF16), ("E", 160), ("K", 8), ("NG", 1), ("TG", 1), ("NORM", True), ("HAS_EPS", False)],
           [("T", BF16), ("E", 384), ("K", 8), ("NG", 1), ("TG", 1), ("NORM", True), ("HAS_EPS", False)],
           [("T", F32), ("E", 256), ("K", 1), ("NG", 8), ("TG", 4), ("NORM", False), ("HAS_EPS", False)]]
    k["sigmoid_router.cu"] = ({"logits": "T", "bias": F32}, {"indices": "uint32", "weights": F32}, sr)
    # qmv_swiglu: T, K, N, KSEL, GS, BITS, E (scales/biases in T; 2/4/8-bit).
    qs, qc = [], []
    for t in FLOATS:
        for bits, gs in [(2, 32), (4, 64), (8, 128)]:
            qs.append([("T", t), ("K", 2048), ("N", 768), ("KSEL", 8), ("GS", gs), ("BITS", bits), ("E", 128)])
            qc.append([("T", t), ("O", t), ("K", 768), ("N", 2048), ("KSEL", 8), ("GS", gs), ("BITS", bits), ("E", 128)])
        if t != F32:  # router weights in float32: out in float32
            qc.append([("T", t), ("O", F32), ("K", 1408), ("N", 2048), ("KSEL", 4), ("GS", 64), ("BITS", 4), ("E", 60)])
    qs.append([("T", F32), ("K", 4096), ("N", 14336), ("KSEL", 2), ("GS", 64), ("BITS", 4), ("E", 8)])
    q_in = {"x": "T", "idx": "uint32", "wg": "uint32", "sg": "T", "bg": "T", "wu": "uint32", "su": "T", "bu": "T"}
    k["qmv_swiglu.cu"] = (q_in, {"out": "T"}, qs)
    c_in = {"h": "T", "idx": "uint32", "w": "O", "wd": "uint32", "sd": "T", "bd": "T"}  # w in O's dtype
    k["qmv_combine.cu"] = (c_in, {"out": "O"}, qc)
    # qmv_grouped (prefill form): T, K, N, KSEL, GS, BITS, E, TB, GLU (gate/up; down; dense E = 1).
    qg = []
    for t in FLOATS:
        for bits, gs in [(2, 32), (4, 64), (8, 128)]:
            qg.append([("T", t), ("K", 2048), ("N", 768), ("KSEL", 8), ("GS", gs), ("BITS", bits), ("E", 128),
                       ("TB", 8), ("GLU", True)])
            qg.append([("T", t), ("K", 768), ("N", 2048), ("KSEL", 8), ("GS", gs), ("BITS", bits), ("E", 128),
                       ("TB", 8), ("GLU", False)])
    qg.append([("T", BF16), ("K", 2048), ("N", 4096), ("KSEL", 1), ("GS", 64), ("BITS", 4), ("E", 1),
               ("TB", 8), ("GLU", False)])
    g_in = {"x": "T", "idx": "uint32", "order": "uint32", "wa": "uint32", "sa": "T", "ba": "T",
            "wb": "uint32", "sb": "T", "bb": "T"}
    k["qmv_grouped.cu"] = (g_in, {"out": "T"}, qg)
    ss = [[("T", t), ("O", t), ("N", 2048), ("KSEL", 8)] for t in FLOATS]
    ss.append([("T", BF16), ("O", F32), ("N", 2048), ("KSEL", 4)])
    k["qmv_slot_sum.cu"] = ({"y": "T", "w": "O"}, {"out": "O"}, ss)
    # rope_decode: T, DIMS, TRAD, HAS_MSCALE.
    rd = [[("T", t), ("DIMS", 64), ("TRAD", False), ("HAS_MSCALE", True)] for t in FLOATS]
    rd += [[("T", F32), ("DIMS", 64), ("TRAD", True), ("HAS_MSCALE", False)],
           [("T", BF16), ("DIMS", 32), ("TRAD", True), ("HAS_MSCALE", True)]]
    k["rope_decode.cu"] = ({"q": "T", "k": "T", "inv_freq": F32, "params": F32}, {"q_out": "T", "k_out": "T"}, rd)
    return k


# ------------------------------------------------------------ the kernels declared in the Rust sources
KERNEL_RE = re.compile(r"static\s+\w+\s*:\s*GpuKernel\s*=\s*GpuKernel\s*\{(.*?)\};", re.S)
CONST_RE = re.compile(r'const\s+(\w+)\s*:\s*&(?:\'static\s+)?str\s*=\s*include_str!\(\s*"([^"]+)"\s*\)\s*;')


def rust_kernels(src_dirs):
    """{body basename: dict(name, inputs, outputs, header (basename or None), where)} for CUDA bodies."""
    files = sorted(p for d in src_dirs for p in Path(d).rglob("*.rs"))
    consts = {}
    for p in files:
        for m in CONST_RE.finditer(p.read_text()):
            consts[m.group(1)] = (p.parent / m.group(2)).resolve()
    out = {}
    for p in files:
        for m in KERNEL_RE.finditer(p.read_text()):
            body = m.group(1)
            f = dict(re.findall(r"(\w+)\s*:\s*(&\[[^\]]*\]|include_str!\(\s*\"[^\"]*\"\s*\)|\"[^\"]*\"|\w+)", body))
            src = re.match(r'include_str!\(\s*"([^"]+)"', f.get("source", ""))
            if not src:
                raise SystemExit(f"[cuda-check] {p}: cannot read the source of a GpuKernel: {body.strip()!r}")
            src_path = (p.parent / src.group(1)).resolve()
            if src_path.suffix != ".cu":
                continue
            names = lambda v: re.findall(r'"([^"]*)"', v or "")
            hdr = f.get("header", '""')
            if hdr.startswith('"'):
                if hdr != '""':
                    raise SystemExit(f"[cuda-check] {p}: inline header strings are not supported here")
                header = None
            elif hdr.startswith("include_str!"):
                header = (p.parent / re.search(r'"([^"]+)"', hdr).group(1)).resolve()
            elif hdr in consts:
                header = consts[hdr]
            else:
                raise SystemExit(f"[cuda-check] {p}: unknown header constant {hdr}")
            k = dict(name=f["name"].strip('"'), inputs=names(f.get("inputs")), outputs=names(f.get("outputs")),
                     header=header.name if header else None, where=os.path.relpath(p, ROOT) if p.resolve().is_relative_to(ROOT) else str(p))
            prev = out.get(src_path.name)
            if prev and (prev["name"], prev["inputs"], prev["outputs"], prev["header"]) != (
                    k["name"], k["inputs"], k["outputs"], k["header"]):
                raise SystemExit(f"[cuda-check] {src_path.name} is declared twice, differently ({prev['where']}, {k['where']})")
            out[src_path.name] = k
    return out


# ------------------------------------------------------------ preparing the MLX wheel's parts
def prepare(wheel, out):
    """Extracts mlx/include/** and the 17 NVRTC in-memory device headers (from libmlx.so) of the
    mlx-cuda-13 wheel into `out`; checks MLX's build literals are in libmlx.so."""
    out = Path(out)
    z = zipfile.ZipFile(wheel)
    n_inc = 0
    for i in z.infolist():
        if i.filename.startswith("mlx/include/") and not i.is_dir():
            dst = out / i.filename[len("mlx/"):]
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(z.read(i))
            n_inc += 1
    d = z.read("mlx/lib/libmlx.so")
    missing = [s for s in MLX_LITERALS if d.find(s.encode()) < 0]
    if missing:
        raise SystemExit(f"[cuda-check] libmlx.so lacks MLX 0.32.2's cuda_kernel literals {missing!r}: "
                         "the wrapper generator in this script no longer matches this MLX")
    names, texts = jit_headers(d)
    jit = out / "jit"
    for n, t in zip(names, texts):
        (jit / n).parent.mkdir(parents=True, exist_ok=True)
        (jit / n).write_bytes(t)
    (jit / "ORDER").write_text("".join(n + "\n" for n in names))
    # Cross-check the pairing: config.h also ships as a plain file in the wheel.
    shipped = out / "include" / "mlx/backend/cuda/device/config.h"
    cfg = (jit / "mlx/backend/cuda/device/config.h").read_bytes()
    if shipped.exists() and shipped.read_bytes().replace("©".encode(), b"  ") != cfg:
        raise SystemExit("[cuda-check] extracted config.h differs from the wheel's: header pairing is wrong")
    print(f"[cuda-check] prepared {out}: {n_inc} include files, {len(names)} JIT device headers from libmlx.so")


def jit_headers(d):
    """MLX embeds the device headers as NUL-terminated strings with two pointer arrays
    (g_headers, g_include_names in jit_module.cpp); in the PIC .so each pointer is an
    R_X86_64_RELATIVE relocation. Find the run of name pointers, then the run of the same
    length whose targets are header texts ("// Copyright…"), nearest to it."""
    if d[:4] != b"\x7fELF" or d[4] != 2 or d[5] != 1:
        raise SystemExit("[cuda-check] libmlx.so is not a little-endian ELF64")
    phoff, shoff = struct.unpack_from("<QQ", d, 0x20)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", d, 0x36)
    loads = []
    for i in range(phnum):
        p_type, _, off, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", d, phoff + i * phentsize)
        if p_type == 1:
            loads.append((vaddr, off, filesz))

    def cstr(v):
        for va, off, sz in loads:
            if va <= v < va + sz:
                o = off + v - va
                return d[o:d.index(b"\0", o)]
        return None
    rel = {}
    for i in range(shnum):
        sh_type, = struct.unpack_from("<I", d, shoff + i * shentsize + 4)
        off, size = struct.unpack_from("<QQ", d, shoff + i * shentsize + 24)
        if sh_type == 4:  # SHT_RELA
            for r in range(off, off + size, 24):
                r_off, r_info, r_add = struct.unpack_from("<QQq", d, r)
                if r_info & 0xFFFFFFFF == 8:  # R_X86_64_RELATIVE
                    rel[r_off] = r_add

    def run(start, pred):
        n = 0
        while start + 8 * n in rel and pred(cstr(rel[start + 8 * n])):
            n += 1
        return n
    is_name = lambda s: s is not None and s.startswith(DEVICE_PREFIX)
    is_text = lambda s: s is not None and s.startswith(b"// Copyright")
    name_runs = [(s, run(s, is_name)) for s in rel if is_name(cstr(rel[s])) and not (s - 8 in rel and is_name(cstr(rel[s - 8])))]
    name_runs = [r for r in name_runs if r[1] >= 10]
    if len(name_runs) != 1:
        raise SystemExit(f"[cuda-check] libmlx.so: expected one array of device header names, found {len(name_runs)}")
    nstart, n = name_runs[0]
    texts = [(s, run(s, is_text)) for s in rel if abs(s - nstart) < 4096 and is_text(cstr(rel[s]))
             and not (s - 8 in rel and is_text(cstr(rel[s - 8])))]
    texts = [s for s, m in texts if m == n]
    if len(texts) != 1:
        raise SystemExit(f"[cuda-check] libmlx.so: expected one array of {n} device header texts near the names, found {len(texts)}")
    names = [cstr(rel[nstart + 8 * i]).decode() for i in range(n)]
    return names, [cstr(rel[texts[0] + 8 * i]) for i in range(n)]


# ------------------------------------------------------------ NVRTC through ctypes
class Nvrtc:
    def __init__(self, cu13):
        lib = Path(cu13) / "lib"
        so = sorted(lib.glob("libnvrtc.so.*"))
        if not so:
            raise SystemExit(f"[cuda-check] no libnvrtc.so.* in {lib} (run scripts/check_cuda_kernels.sh)")
        for b in sorted(lib.glob("libnvrtc-builtins.so.*")):  # dlopen'ed by libnvrtc
            ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(str(so[0]))
        L = self.lib
        L.nvrtcGetErrorString.restype = ctypes.c_char_p
        L.nvrtcGetErrorString.argtypes = [ctypes.c_int]
        maj, mnr = ctypes.c_int(), ctypes.c_int()
        self._ok(L.nvrtcVersion(ctypes.byref(maj), ctypes.byref(mnr)), "nvrtcVersion")
        self.version = (maj.value, mnr.value)

    def _ok(self, rc, what):
        if rc != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(rc).decode()}")

    def compile(self, source, prog_name, headers, options, name_exprs):
        """Returns (ok, log, [lowered names], cubin bytes)."""
        L = self.lib
        prog = ctypes.c_void_p()
        arr = lambda xs: (ctypes.c_char_p * len(xs))(*[x if isinstance(x, bytes) else x.encode() for x in xs])
        hn, ht = list(headers.keys()), list(headers.values())
        self._ok(L.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), prog_name.encode(), len(hn), arr(ht), arr(hn)),
                 "nvrtcCreateProgram")
        try:
            for n in name_exprs:
                self._ok(L.nvrtcAddNameExpression(prog, n.encode()), "nvrtcAddNameExpression")
            rc = L.nvrtcCompileProgram(prog, len(options), arr(options))
            size = ctypes.c_size_t()
            self._ok(L.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "nvrtcGetProgramLogSize")
            buf = ctypes.create_string_buffer(size.value + 1)
            self._ok(L.nvrtcGetProgramLog(prog, buf), "nvrtcGetProgramLog")
            log = buf.value.decode(errors="replace").strip()
            if rc != 0:
                return False, log or L.nvrtcGetErrorString(rc).decode(), None, 0
            names = []
            for n in name_exprs:
                lowered = ctypes.c_char_p()
                self._ok(L.nvrtcGetLoweredName(prog, n.encode(), ctypes.byref(lowered)), "nvrtcGetLoweredName")
                names.append(lowered.value.decode())
            self._ok(L.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            return True, log, names, size.value
        finally:
            L.nvrtcDestroyProgram(ctypes.byref(prog))


# ------------------------------------------------------------ the check
def cases(kernels_dir, src_dirs):
    decl = rust_kernels(src_dirs)
    table = instances()
    errors = []
    on_disk = sorted(p.name for p in Path(kernels_dir).glob("*.cu"))
    for f in on_disk:
        if f not in decl:
            errors.append(f"{f}: no `GpuKernel` in {', '.join(map(str, src_dirs))} uses it")
    for f, k in sorted(decl.items()):
        if f not in table:
            errors.append(f"{f} ({k['where']}): no instantiations listed in INSTANCES of {Path(__file__).name}")
            continue
        ins, outs, _ = table[f]
        if list(ins) != k["inputs"] or list(outs) != k["outputs"]:
            errors.append(f"{f}: {k['where']} declares inputs {k['inputs']} outputs {k['outputs']}, "
                          f"{Path(__file__).name} has {list(ins)} {list(outs)}: update INSTANCES")
    if errors:
        raise SystemExit("[cuda-check] " + "\n[cuda-check] ".join(errors))
    out = []
    for f, k in sorted(decl.items()):
        ins, outs, insts = table[f]
        for t in insts:
            tm = dict(t)
            res = lambda dt: tm[dt] if dt in ("T", "O") else dt
            label = f"{f}[" + ",".join(f"{n}={v if not isinstance(v, bool) else str(v).lower()}" for n, v in t) + "]"
            out.append(dict(label=label, file=f, kernel=k, inputs=[(n, res(v)) for n, v in ins.items()],
                            outputs=[(n, res(v)) for n, v in outs.items()], template=t))
    return out


def run_check(a):
    mlx = Path(a.mlx)
    jit = mlx / "jit"
    if not (jit / "ORDER").exists():
        raise SystemExit(f"[cuda-check] {jit}/ORDER missing: run scripts/check_cuda_kernels.sh (it prepares {mlx})")
    headers = {n: (jit / n).read_bytes() for n in (jit / "ORDER").read_text().split()}
    include = [mlx / "include", mlx / "include" / "cccl", Path(a.nvidia) / "include"]
    for p in include:
        if not p.is_dir():
            raise SystemExit(f"[cuda-check] include path {p} missing: run scripts/check_cuda_kernels.sh")
    options = NVRTC_FIXED_OPTIONS + [f"--gpu-architecture={a.arch}"] + [f"--include-path={p}" for p in include]
    nv = Nvrtc(a.nvidia)
    kdir = Path(a.kernels)
    todo = [c for c in cases(kdir, a.src) if not a.only or re.search(a.only, c["label"])]
    if not todo:
        raise SystemExit(f"[cuda-check] no case matches --only {a.only!r}")
    groups = {}
    for c in todo:
        k = c["kernel"]
        body = (kdir / c["file"]).read_text()
        c["header"] = (kdir / k["header"]).read_text() if k["header"] else ""
        c["fname"] = kernel_name(k["name"], c["template"])
        c["body"] = body
        c["function"] = build_function(c["fname"], body, c["inputs"], c["outputs"], c["template"])
        groups.setdefault(c["file"], {})[c["fname"]] = c  # same name = same source: compiled once
    print(f"[cuda-check] NVRTC {nv.version[0]}.{nv.version[1]}, {a.arch}, {len(todo)} instantiations of "
          f"{len(groups)} bodies in {kdir} ({'one program each, as MLX' if a.exact else 'one program per body'})",
          flush=True)
    failed = 0
    t_all = time.time()

    def exact(c):
        src = build_source(c["header"], [c["function"]])
        if a.show_source:
            print(f"// ---- {c['label']}\n{src}")
        t0 = time.time()
        r = nv.compile(src, c["fname"] + ".cu", headers, options, ["mlx::core::cu::" + c["fname"]])
        return r, time.time() - t0

    def report(c, r, how):
        ok, log, lowered, cubin = r
        if ok:
            print(f"ok    {c['label']}  ({how})", flush=True)
            if a.verbose:
                print(f"      kernel {lowered[0]}")
            if log and a.verbose:
                print("      " + log.replace("\n", "\n      "))
            return 0
        first = (DEFAULT_HEADER + c["header"] + NS_OPEN + c["function"][:-len(c["body"])]).count("\n") + 1
        print(f"FAIL  {c['label']}  ({c['kernel']['where']}, body {c['file']})\n      "
              + log.replace("\n", "\n      ")
              + f"\n      (line {first} of the generated source is line 1 of {c['file']}; --show-source prints it)",
              flush=True)
        return 1

    for f, cs in groups.items():
        cs = list(cs.values())
        if not a.exact:
            # All instantiations of one body in one program: each namespace block + function is
            # exactly MLX's text, the includes (identical for all) are parsed once. If it fails,
            # every instantiation is compiled alone, as MLX does, to name the failing ones.
            src = build_source(cs[0]["header"], [c["function"] for c in cs])
            if a.show_source:
                print(f"// ---- {f} (all instantiations)\n{src}")
            t0 = time.time()
            ok, log, lowered, _ = nv.compile(src, f + ".cu", headers, options,
                                             ["mlx::core::cu::" + c["fname"] for c in cs])
            if ok:
                dt = time.time() - t0
                for c, low in zip(cs, lowered):
                    failed += report(c, (True, log, [low], 0), f"{len(cs)} in one program, {dt:.1f} s")
                continue
        for c in cs:
            r, dt = exact(c)
            failed += report(c, r, f"{dt:.1f} s alone")
    print(f"[cuda-check] {time.time() - t_all:.1f} s")
    print(f"cuda-check: {len(todo) - failed} passed, {failed} failed")
    return 1 if failed else 0


def self_check(a):
    """Runs the check on a copy of the bodies with a syntax error: it must exit 1, and the intact
    copy must pass the same case (so the failure is the injected one)."""
    case = r"^swiglu\.cu\[T=float32\]$"
    base = [sys.executable, str(Path(__file__).resolve()), "--mlx", a.mlx, "--nvidia", a.nvidia, "--arch", a.arch,
            "--only", case] + sum((["--src", s] for s in a.src), [])
    with tempfile.TemporaryDirectory(prefix="zmlx-cuda-check-") as tmp:
        broken = Path(tmp) / "cuda"
        shutil.copytree(a.kernels, broken)
        with open(broken / "swiglu.cu", "a") as f:
            f.write("\nT zmlx_self_check_error = ;\n")
        good = subprocess.run(base + ["--kernels", a.kernels], capture_output=True, text=True)
        bad = subprocess.run(base + ["--kernels", str(broken)], capture_output=True, text=True)
    print("[self-check] intact body:  exit %d" % good.returncode)
    print("[self-check] broken body:  exit %d" % bad.returncode)
    shown = [l for l in bad.stdout.strip().splitlines() if not re.match(r"\S+: \d+ passed, \d+ failed", l)]
    print("      " + "\n      ".join(shown))
    if good.returncode == 0 and bad.returncode == 1 and "FAIL" in bad.stdout and "zmlx_self_check_error" in bad.stdout:
        print("self-check: 1 passed, 0 failed (a syntax error in a body fails the check with exit 1)")
        return 0
    print(good.stdout + good.stderr + bad.stderr)
    print("self-check: 0 passed, 1 failed")
    return 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cache = ROOT / ".mlx" / "cuda-check"
    ap.add_argument("--mlx", default=str(cache / "mlx-cuda-13-0.32.2"), help="prepared MLX wheel parts")
    ap.add_argument("--nvidia", default=None, help="the nvidia/cu13 folder (libnvrtc, CUDA headers)")
    ap.add_argument("--kernels", default=str(ROOT / "kernels" / "cuda"), help="folder of the CUDA bodies")
    ap.add_argument("--src", action="append", help="Rust source folders to read GpuKernel declarations from")
    ap.add_argument("--arch", default="sm_90a", help="NVRTC --gpu-architecture (MLX uses sm_<cc>a from cc 9)")
    ap.add_argument("--exact", action="store_true", help="compile each instantiation alone, as MLX does (slower)")
    ap.add_argument("--only", help="regex over case labels, e.g. 'moe_router'")
    ap.add_argument("--show-source", action="store_true", help="print each generated source")
    ap.add_argument("-v", "--verbose", action="store_true", help="print NVRTC warnings of passing cases")
    ap.add_argument("--self-check", action="store_true", help="prove a broken body fails the check")
    ap.add_argument("--prepare", metavar="WHEEL", help="extract headers from the mlx-cuda-13 wheel into --mlx, then exit")
    a = ap.parse_args()
    a.src = a.src or [str(ROOT / "src"), str(ROOT / "patterns")]
    if a.prepare:
        prepare(a.prepare, a.mlx)
        return 0
    if a.nvidia is None:
        found = sorted(cache.glob("nvidia-*/nvidia/cu13"))
        if not found:
            raise SystemExit("[cuda-check] no NVRTC under .mlx/cuda-check: run scripts/check_cuda_kernels.sh")
        a.nvidia = str(found[-1])
    return self_check(a) if a.self_check else run_check(a)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
