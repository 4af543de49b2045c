"""Static GPU evidence, without a GPU: registers, spills, shared memory, theoretical occupancy and tensor-core
instructions of every kernel vitops ships, for sm_80 (A100) and sm_90 (H100/H200).

    python -m benchmarks.static [--defaults] [--arch 80,90] [--jobs N] [--out FILE] [--ptx-dir DIR]
    make gpu-static

CUDA kernels are read from the compiled library (vitops/_C*.so, whose cubins setup.py builds for sm_80 and sm_90).
Triton kernels are compiled ahead of time for sm_80 and sm_90a at every configuration their launchers can pick
(enumerated by calling the launchers' own config helpers over the whole range of shapes and dtypes they accept),
specialized as a launch specializes them: Triton's own binder runs over example arguments of a representative
problem (meta tensors stand in for tensors), so pointer alignment and strides divisible by 16 are known to the
compiler exactly as at run time. Both kinds of binary are then read the same way, with cuobjdump (-res-usage:
registers, stack, static shared memory; -sass: tensor-core and local-memory instructions; -elf: launch bounds).
Triton 3.8 fills a compiled kernel's n_regs and n_spills only when it loads it on a GPU, hence cuobjdump.

Spills are counted from the SASS: the bytes moved by local-memory stores (STL) and loads (LDL), the figures ptxas
-v prints as "bytes spill stores/loads" (a kernel with a local array shows them too). Occupancy is the
theoretical one of the CUDA occupancy calculator (cuda_occupancy.h): registers are allocated per warp in units of
256 from one of the SM's 4 sub-partitions (16384 registers each), shared memory in units of 128 bytes plus 1 KB
that the driver reserves per block, at most 2048 threads and 32 blocks per SM, and the largest shared-memory
carveout (228 KB per SM on sm_90, 164 KB on sm_80).

The report (benchmarks/results/static-sm90.json) holds both architectures, one record per kernel, configuration
and architecture; `roofline` holds benchmarks/roofline.py's predictions when that module exists.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import functools
import importlib
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "benchmarks" / "results" / "static-sm90.json"
ARCHS = (80, 90)

# The CUDA kernels that multiply matrices (attention's forward and gradient kernels, not its delta reduction):
# unless instantiated for float32/float64 they must use tensor cores. A Triton kernel is one when its IR has a
# tt.dot on 16-bit operands.
CUDA_MATRIX_KERNELS = re.compile(r"attention_(forward|backward_dq|backward_dkdv|grad_q|grad_kv)_kernel\b")
TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA", "BMMA", "BGMMA")


# --- occupancy ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SMLimits:
    shared_per_sm: int  # bytes, at the largest carveout
    shared_per_block: int  # bytes a block may opt in to
    registers: int = 65536
    register_unit: int = 256  # registers are allocated per warp, rounded up to this
    sub_partitions: int = 4  # a warp's registers come from one sub-partition's share
    shared_reserved: int = 1024  # bytes the driver reserves per block
    shared_unit: int = 128
    max_threads: int = 2048
    max_blocks: int = 32


SM_LIMITS = {80: SMLimits(164 * 1024, 163 * 1024), 90: SMLimits(228 * 1024, 227 * 1024)}


def occupancy(limits: SMLimits, registers: int, shared: int, threads: int) -> dict:
    """Blocks and warps per SM, the fraction of the SM's 64 warps, and what limits them."""
    warps = -(-threads // 32)
    regs_per_warp = -(-registers * 32 // limits.register_unit) * limits.register_unit
    if regs_per_warp * -(-warps // limits.sub_partitions) * limits.sub_partitions > limits.registers:
        by_registers = 0
    elif regs_per_warp:
        warps_per_partition = limits.registers // limits.sub_partitions // regs_per_warp
        by_registers = warps_per_partition * limits.sub_partitions // warps
    else:
        by_registers = limits.max_blocks
    shared_allocated = -(-(shared + limits.shared_reserved) // limits.shared_unit) * limits.shared_unit
    by_shared = 0 if shared > limits.shared_per_block else limits.shared_per_sm // shared_allocated
    bounds = {
        "registers": by_registers,
        "shared": by_shared,
        "threads": limits.max_threads // (warps * 32),
        "blocks": limits.max_blocks,
    }
    blocks = min(bounds.values())
    return {
        "blocks_per_sm": blocks,
        "warps_per_sm": blocks * warps,
        "occupancy": round(blocks * warps * 32 / limits.max_threads, 4),
        "limited_by": min(bounds, key=bounds.get),
    }


# --- reading binaries -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class BinaryKernel:
    """One kernel of one cubin, as cuobjdump reads it."""

    arch: int
    source: str  # the compilation unit (cuobjdump's identifier); "" for a lone cubin
    name: str  # mangled
    registers: int = 0
    stack_bytes: int = 0
    static_shared: int = 0
    spill_store_bytes: int = 0
    spill_load_bytes: int = 0
    max_threads: int | None = None  # launch bounds (__launch_bounds__, Triton's num_warps)
    tensor_core_ops: dict = dataclasses.field(default_factory=dict)  # SASS mnemonic -> count


def cuobjdump() -> str:
    from triton import knobs

    return knobs.nvidia.cuobjdump.path


def _sections(text: str, arch: int) -> Iterable[tuple[int, str, str]]:
    """(arch, source, line) for each line of a cuobjdump listing: a fat binary names each cubin's arch and
    source in a header; a lone cubin has neither."""
    source = ""
    for line in text.splitlines():
        if m := re.match(r"arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"identifier = (.*)", line):
            source = m.group(1).strip()
        else:
            yield arch, source, line


_ACCESS_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def read_binary(path: str, arch: int = 0) -> list[BinaryKernel]:
    """Every kernel of the cubins in `path` (a cubin, or a library with fat binaries; none if it has no device
    code). `arch`: a lone cubin's."""
    listings = {}
    for option in ("-res-usage", "-sass", "-elf"):
        result = subprocess.run([cuobjdump(), option, path], capture_output=True, text=True, check=False)
        if result.returncode and "does not contain device code" not in result.stderr + result.stdout:
            raise RuntimeError(f"cuobjdump {option} {path} failed: {result.stderr}")
        listings[option] = result.stdout if result.returncode == 0 else ""
    return parse_cuobjdump(listings["-res-usage"], listings["-sass"], listings["-elf"], arch)


def parse_cuobjdump(res_usage: str, sass: str, elf: str, arch: int = 0) -> list[BinaryKernel]:
    """The kernels of cuobjdump's -res-usage, -sass and -elf listings of one binary."""
    kernels: dict[tuple[int, str], BinaryKernel] = {}
    current = None
    for arch_, source, line in _sections(res_usage, arch):
        if m := re.match(r"\s*Function (\S+):", line):
            current = kernels.setdefault((arch_, m.group(1)), BinaryKernel(arch_, source, m.group(1)))
        elif current is not None and (m := re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", line)):
            current.registers, current.stack_bytes, current.static_shared = map(int, m.groups())
            current = None

    current = None
    for arch_, _, line in _sections(sass, arch):
        if m := re.match(r"\s*code for sm_(\d+)", line):
            arch_ = int(m.group(1))
        if m := re.match(r"\s*Function : (\S+)", line):
            current = kernels.get((arch_, m.group(1)))
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9]*)((?:\.[A-Z0-9_]+)*)", line)
        if current is None or m is None:
            continue
        mnemonic, suffixes = m.group(1), m.group(2).split(".")[1:]
        if mnemonic in TENSOR_CORE_OPS:
            current.tensor_core_ops[mnemonic] = current.tensor_core_ops.get(mnemonic, 0) + 1
        elif mnemonic in ("STL", "LDL"):
            size = next((_ACCESS_BYTES[s] for s in suffixes if s in _ACCESS_BYTES), 4)
            if mnemonic == "STL":
                current.spill_store_bytes += size
            else:
                current.spill_load_bytes += size

    current, attribute = None, None
    for arch_, _, line in _sections(elf, arch):
        if m := re.match(r"\.nv\.info\.(\S+)", line):
            current = kernels.get((arch_, m.group(1)))
            attribute = None
        elif current is not None and (m := re.match(r"\s*Attribute:\s*(\w+)", line)):
            attribute = m.group(1)
        elif (
            current is not None
            and attribute in ("EIATTR_MAX_THREADS", "EIATTR_REQNTID")
            and (m := re.match(r"\s*Value:\s*((?:0x[0-9a-f]+\s*)+)", line))
        ):
            current.max_threads = math.prod(int(v, 16) for v in m.group(1).split())
            attribute = None
    return list(kernels.values())


def demangle(names: list[str]) -> list[str]:
    """Readable kernel names: c++filt's, without return type, arguments and namespaces."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return names
    lines = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    readable = []
    for name in lines.splitlines():
        depth = 0
        for i, ch in enumerate(name):  # cut the argument list: the first "(" outside template brackets
            depth += {"<": 1, ">": -1}.get(ch, 0)
            if ch == "(" and depth == 0 and not name.startswith("(anonymous", i):
                name = name[:i]
                break
        name = re.sub(r"^void ", "", name)
        head, bracket, template = name.partition("<")
        name = head.rsplit("::", 1)[-1] + bracket + re.sub(r"vitops::cuda::|\(anonymous namespace\)::", "", template)
        name = re.sub(r"\bc10::Half\b|\bwarp::Fp16\b", "half", name)
        name = re.sub(r"\bc10::BFloat16\b|\bwarp::Bf16\b", "bf16", name)
        readable.append(name)
    return readable


# --- records ------------------------------------------------------------------------------------------------------


def _record(binary: BinaryKernel, **fields) -> dict:
    """A report row: the binary's figures, occupancy, and `fields` (kind, op, kernel, dtype, config, default,
    dynamic_shared, threads, needs_tensor_cores)."""
    threads = fields.get("threads") or binary.max_threads
    dynamic = fields.get("dynamic_shared")
    record = {
        **fields,
        "arch": f"sm_{binary.arch}",
        "threads": threads,
        "registers": binary.registers,
        "stack_bytes": binary.stack_bytes,
        "spill_store_bytes": binary.spill_store_bytes,
        "spill_load_bytes": binary.spill_load_bytes,
        "static_shared": binary.static_shared,
        "dynamic_shared": dynamic,
        "tensor_core_ops": dict(sorted(binary.tensor_core_ops.items())),
    }
    limits = SM_LIMITS.get(binary.arch)
    if threads and limits:
        record.update(occupancy(limits, binary.registers, binary.static_shared + (dynamic or 0), threads))
    else:
        record.update(blocks_per_sm=None, warps_per_sm=None, occupancy=None, limited_by=None)
    return record


def spills(record: dict) -> bool:
    return bool(record["spill_store_bytes"] or record["spill_load_bytes"] or record["stack_bytes"])


def missing_tensor_cores(record: dict) -> bool:
    return record["needs_tensor_cores"] and not record["tensor_core_ops"]


_CUDA_DTYPES = {"half": "float16", "bf16": "bfloat16", "float": "float32", "double": "float64"}


def cuda_library() -> Path | None:
    found = sorted((ROOT / "vitops").glob("_C*.so"))
    return found[0] if found else None


def cuda_records(library: Path) -> list[dict]:
    """The kernels of the compiled library, per architecture. Every instantiation in it is one some launch uses,
    so each counts as a default configuration. Dynamic shared memory is set at launch, so the occupancy counts
    static shared memory only; it needs launch bounds (threads per block are otherwise unknown to the binary)."""
    kernels = [k for k in read_binary(str(library)) if k.arch in SM_LIMITS]
    records = []
    for binary, name in zip(kernels, demangle([k.name for k in kernels]), strict=True):
        unit = re.search(r"csrc/cuda/([^/]+)", binary.source)  # csrc/cuda/<op>.cu or csrc/cuda/<op>/...
        op = Path(unit.group(1) if unit else binary.source).stem
        types = re.findall(r"\b(half|bf16|float|double)\b", name[name.find("<") :] if "<" in name else "")
        dtype = "+".join(dict.fromkeys(_CUDA_DTYPES[t] for t in types))
        wide = bool(types) and set(types) <= {"float", "double"}  # a float32/float64 instantiation
        records.append(
            _record(
                binary, kind="cuda", op=op, kernel=name, dtype=dtype, config="", default=True,
                dynamic_shared=None,
                needs_tensor_cores=bool(CUDA_MATRIX_KERNELS.match(name)) and not wide,
            )
        )  # fmt: skip
    return records


# --- Triton kernels -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Launch:
    """One launch of a Triton kernel as its launcher makes it: the arguments of a representative problem (meta
    tensors stand in for tensors) and the constexprs and options, from the launcher's config helper."""

    op: str
    kernel: Any  # triton.JITFunction
    args: tuple
    meta: dict
    dtype: str
    problem: str  # the representative problem, in words
    default: bool  # the configuration of the package's headline shapes

    @property
    def config(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.meta.items() if not hasattr(v, "primitive_bitwidth"))


def compile_launch(launch: Launch, arch: int):
    """The kernel compiled for `arch` exactly as JITFunction.run compiles it on a GPU of that arch: Triton's
    binder specializes the arguments (types, 16-divisibility, constants) and parses the options."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.meta, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _uses_16bit_dot(ttir: str) -> bool:
    return re.search(r"tt\.dot .*:\s*tensor<[0-9x]+x(?:f16|bf16)>", ttir) is not None


def triton_record(launch: Launch, arch: int, ptx_dir: str | None = None) -> dict:
    compiled = compile_launch(launch, arch)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        (binary,) = read_binary(cubin.name, arch)
    record = _record(
        binary, kind="triton", op=launch.op, kernel=launch.kernel.__name__, dtype=launch.dtype,
        config=launch.config, default=launch.default, problem=launch.problem,
        threads=compiled.metadata.num_warps * 32, dynamic_shared=compiled.metadata.shared,
        needs_tensor_cores=_uses_16bit_dot(compiled.asm["ttir"]),
    )  # fmt: skip
    if ptx_dir:
        record["ptx"] = os.path.join(ptx_dir, re.sub(r"[^\w.=@+-]+", "_", record_id(record)) + ".ptx")
        Path(record["ptx"]).write_text(compiled.asm["ptx"])
    return record


def record_id(record: dict) -> str:
    problem = f" ({record['problem']})" if record.get("problem") else ""
    return f"{record['kernel']}[{record['dtype']} {record['config']}]{problem}@{record['arch']}"


def _meta_tensor(dtype, *shape):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def attention_kernel_args(module, dtype, n_q: int, n_k: int, head_dim: int, heads: int = 12) -> dict:
    """Each attention kernel's arguments, as forward_into/backward_into pass them, for a batch of 2 packed
    (B, N, 3*H*D) qkv tensors (timm's Linear output), the (B, N, H*D) output and gradients in the same layout."""
    import torch

    batch = 2
    q = module.packed_views(_meta_tensor(dtype, batch, n_q, 3 * heads * head_dim), heads, 3)[0]
    _, k, v = module.packed_views(_meta_tensor(dtype, batch, n_k, 3 * heads * head_dim), heads, 3)
    (o,) = module.packed_views(_meta_tensor(dtype, batch, n_q, heads * head_dim), heads, 1)
    do = o
    dq = module.packed_views(_meta_tensor(dtype, batch, n_q, 3 * heads * head_dim), heads, 3)[0]
    _, dk, dv = module.packed_views(_meta_tensor(dtype, batch, n_k, 3 * heads * head_dim), heads, 3)
    lse = delta = _meta_tensor(torch.float32, batch, heads, n_q)
    s = module._bhn
    scale = head_dim**-0.5
    sizes = (heads, n_q, n_k, head_dim)
    return {
        "_fwd_kernel": (q, k, v, o, lse, *s(q), *s(k), *s(v), *s(o), *sizes, scale * module.LOG2E),
        "_bwd_dq_kernel": (
            q, k, v, o, do, lse, delta, dq, *s(q), *s(k), *s(v), *s(o), *s(do), *s(dq), *sizes, scale,
            scale * module.LOG2E,
        ),
        "_bwd_dkdv_kernel": (
            q, k, v, do, lse, delta, dk, dv, *s(q), *s(k), *s(v), *s(do), *s(dk), *s(dv), *sizes, scale,
            scale * module.LOG2E,
        ),
    }  # fmt: skip


# --- the launches of each Triton op: every configuration its launcher can pick -------------------------------------
#
# Each op's launches come from its launcher's config helper, called over every shape and dtype the op accepts (or
# probes that reach every value the helper can return: every size up to 16 and both sides of each power of two
# up to 2^14, beyond which the helpers' tile sizes are capped). A configuration's representative problem is the
# first one that picks it, so the headline shapes come first; their configurations are the defaults. Optional
# inputs are all present (the heaviest variant); constexprs that select other code (optimizer stages and modes)
# are enumerated.

SIZE_PROBES = sorted({*range(1, 17), *(2**k + d for k in range(4, 15) for d in (-1, 0, 1))})


def _default_drop_path_dtypes():
    import torch

    return ((torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16))


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def attention_launches(module) -> list[Launch]:
    """Each kernel at each configuration, twice: for a head_dim that is a multiple of 16 (ViT's 64 first), whose
    strides the compiler then knows to be 16-divisible, and for the smallest other head_dim that picks it (odd
    strides: unvectorized loads, more registers)."""
    import torch

    from vitops.ops._attention import MAX_HEAD_DIM

    head_dims = (64, 32, 128, 96, 80, *range(1, MAX_HEAD_DIM + 1))  # the model zoo's first; ViT-S/B/L: 64
    dtypes = [d for d in (torch.bfloat16, torch.float16, torch.float32, torch.float64) if module.supports(d)]
    launches = {}
    for dtype in dtypes:
        for head_dim in head_dims:
            for name, meta in module.launch_meta(head_dim, dtype).items():
                key = (name, dtype, tuple(meta.items()), head_dim % 16 == 0)
                if key not in launches:
                    args = attention_kernel_args(module, dtype, 197, 197, head_dim)[name]
                    problem = f"packed qkv, B=2 N=197 H=12 D={head_dim}"
                    launches[key] = Launch("attention", getattr(module, name), args, meta, _dtype_name(dtype),
                                           problem, default=head_dim == 64)  # fmt: skip
    return list(launches.values())


def drop_path_add_launches(module) -> list[Launch]:
    """The forward and backward at every tile shape, for each (output, branch) dtype pair; the defaults are
    float32 training and bfloat16 autocast (a float32 residual stream with bfloat16 branches, or all bfloat16)."""
    import torch

    from vitops.ops import _drop_path, reference

    headline = {  # (output shape, gamma shape): ViT-B's token stream and a ResNet-50 stage, with LayerScale
        "ViT-B tokens (256, 197, 768), gamma (768,)": ((256, 197, 768), (768,)),
        "ResNet-50 NCHW (256, 256, 56, 56), gamma (256, 1, 1)": ((256, 256, 56, 56), (256, 1, 1)),
    }
    layouts = {
        problem: module._memory_layout(_meta_tensor(torch.float32, *shape), _meta_tensor(torch.float32, *g))
        for problem, (shape, g) in headline.items()
    }
    for channels in SIZE_PROBES:
        for inner in SIZE_PROBES:
            layouts.setdefault(
                f"64 rows x {channels} channels x {inner}",
                module._MemoryLayout(64 * channels * inner, channels * inner, channels, inner),
            )
    dtypes = _drop_path.KERNEL_DTYPES
    pairs = [(o, b) for o in dtypes for b in dtypes if _drop_path._supported_pair(o, b)]
    launches = {}
    for out_dtype, branch_dtype in pairs:
        acc = reference.accumulate_dtype(out_dtype)
        dtype = _dtype_name(out_dtype) + ("" if branch_dtype == out_dtype else f"+{_dtype_name(branch_dtype)}")
        out, branch, channel, sample = (_meta_tensor(d, 1) for d in (out_dtype, branch_dtype, acc, acc))
        for problem, layout in layouts.items():
            sizes = (layout.rows, layout.channels, layout.inner, layout.rows_per_sample)
            for kernel, meta, args in (
                (module._forward_kernel, module.forward_meta(layout, out_dtype, True, True, True),
                 (out, branch, channel, sample, out, *sizes)),
                (module._backward_kernel, module.backward_meta(layout, out_dtype, True, True, True, True),
                 (out, branch, channel, sample, branch, channel, *sizes)),
            ):  # fmt: skip
                key = (kernel.__name__, dtype, tuple(meta.items()))
                if key not in launches:
                    default = problem in headline and (out_dtype, branch_dtype) in _default_drop_path_dtypes()
                    launches[key] = Launch("drop_path_add", kernel, args, meta, dtype, problem, default)
    return list(launches.values())


def fuse_conv_bn_launches(module) -> list[Launch]:
    from vitops.ops import _fuse_conv_bn, reference

    headline = "ResNet-50 conv 3x3 (64, 64, 3, 3)"
    problems = {headline: (64, 576), **{f"64 channels x {k} weights": (64, k) for k in SIZE_PROBES}}
    launches = {}
    for dtype in _fuse_conv_bn.KERNEL_DTYPES:
        acc = reference.accumulate_dtype(dtype)
        for problem, (channels, per_channel) in problems.items():
            meta = module.launch_meta(dtype, per_channel, True, True, True)
            key = (dtype, tuple(meta.items()))
            if key not in launches:
                weight, channel = _meta_tensor(dtype, 1), _meta_tensor(acc, 1)
                args = (weight, *[channel] * 5, weight, weight, channels, per_channel, 1e-5)
                launches[key] = Launch("fuse_conv_bn", module._fuse_conv_bn_kernel, args, meta, _dtype_name(dtype),
                                       problem, problem == headline)  # fmt: skip
    return list(launches.values())


def optim_launches(modules: dict) -> list[Launch]:
    """The LAMB and AdamP kernels (vitops/ops/triton/lamb.py, adamp.py) and the segment sums of their multi-tensor
    plans (_multi_tensor.py), with the launchers' block sizes and options, which depend on no shape: every variant
    (param dtype, moment formula, clipping, stage...), the defaults being those of the optimizers' default
    hyperparameters (LAMB: grad averaging, clipping, weight decay so layer adaptation; AdamP with and without
    Nesterov)."""
    import torch

    def find(kernel: str):
        return next((name, m) for name, m in modules.items() if hasattr(m, kernel))

    _, mt = find("_segment_sum_kernel")
    table, f32 = _meta_tensor(torch.int64, 1), _meta_tensor(torch.float32, 1)
    launches = []

    def add(kernel: str, dtype_arg: str, args: tuple, variants: list[dict], default: Callable[[dict], bool], **fixed):
        op, module = find(kernel)
        for dtype, tl_dtype in mt.TL_DTYPES.items():
            for variant in variants:
                meta = {dtype_arg: tl_dtype, **variant, **fixed}
                launches.append(Launch(op, getattr(module, kernel), args, meta, _dtype_name(dtype), "any",
                                       default(variant)))  # fmt: skip

    step = dict(BLOCK=mt.BLOCK, **mt.STEP_OPTIONS)
    add("_lamb_sq_sum_kernel", "DTYPE", (table, table, f32), [{}], lambda v: True, **step)
    # skip_nonfinite's variants (SKIPPABLE) are compiled too; the defaults are the optimizers' (False).
    add(
        "_lamb_moments_kernel", "PARAM_DTYPE", (table, table, f32, f32, f32, *[0.9] * 11),
        [dict(MODE=mode, FINISH=finish, HAS_CLIP=clip, SKIPPABLE=skippable) for mode in (0, 1, 2)
         for finish in (False, True) for clip in (False, True) for skippable in (False, True)],
        lambda v: v["MODE"] == 0 and v["HAS_CLIP"] and not v["FINISH"] and not v["SKIPPABLE"], **step,
    )  # fmt: skip
    add("_lamb_apply_kernel", "PARAM_DTYPE", (table, table, f32, f32, *[0.9] * 6),
        [dict(TRUST_CLIP=clip, SKIPPABLE=skippable) for clip in (False, True) for skippable in (False, True)],
        lambda v: not v["TRUST_CLIP"] and not v["SKIPPABLE"], **step)  # fmt: skip
    add(
        "_adamp_kernel", "PARAM_DTYPE", (table, table, f32, f32, f32, f32, f32, 37, *[0.9] * 6),
        [dict(NESTEROV=nesterov, STAGE=stage, SKIPPABLE=skippable) for stage in (1, 2) for nesterov in (False, True)
         for skippable in (False, True)], lambda v: not v["SKIPPABLE"],
        TILE_COLS=mt.TILE_COLS, **step,
    )  # fmt: skip
    for width in (1, 2, 4):
        for segments, slots in ((1, mt._SUM_BLOCK), (mt._SUM_BLOCK, 1)):
            meta = dict(WIDTH=width, SEGMENTS=segments, SLOTS=slots)
            launches.append(Launch("_multi_tensor", mt._segment_sum_kernel, (f32, table, f32, 37), meta, "float32",
                                   "any", True))  # fmt: skip
    return launches


def triton_modules() -> dict:
    """vitops/ops/triton/<op>.py by op. Compiling needs Triton's JIT functions, not the interpreter's."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("benchmarks.static compiles Triton kernels: run it without TRITON_INTERPRET=1")
    stems = sorted(p.stem for p in (ROOT / "vitops" / "ops" / "triton").glob("*.py") if p.stem != "__init__")
    return {stem: importlib.import_module(f"vitops.ops.triton.{stem}") for stem in stems}


@functools.cache
def triton_launches() -> tuple[Launch, ...]:
    modules = triton_modules()
    return (
        *attention_launches(modules["attention"]),
        *drop_path_add_launches(modules["drop_path_add"]),
        *fuse_conv_bn_launches(modules["fuse_conv_bn"]),
        *optim_launches(modules),
    )


def unlaunched_kernels() -> list[str]:
    """Triton kernels (JIT functions named *_kernel) that no enumerator launches."""
    launched = {launch.kernel for launch in triton_launches()}
    return [
        f"{stem}.{name}"
        for stem, module in triton_modules().items()
        for name, fn in vars(module).items()
        if name.endswith("_kernel") and hasattr(fn, "params") and fn not in launched
    ]


# --- the report ---------------------------------------------------------------------------------------------------


def _compile_job(job: tuple[int, int, str | None]) -> dict:
    index, arch, ptx_dir = job
    return triton_record(triton_launches()[index], arch, ptx_dir)


def triton_records(archs: Iterable[int], defaults_only: bool, jobs: int, ptx_dir: str | None = None) -> list[dict]:
    """Compiles the launches (in `jobs` processes: compiling is CPU-bound) and reads them."""
    work = [(i, arch, ptx_dir) for i, launch in enumerate(triton_launches()) if launch.default or not defaults_only
            for arch in archs]  # fmt: skip
    if jobs <= 1:
        return [_compile_job(job) for job in work]
    context = multiprocessing.get_context("fork")  # the workers inherit the enumerated launches
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))


def _tool_version(command: list[str]) -> str | None:
    try:
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()
    except (OSError, subprocess.CalledProcessError):
        return None
    return next((line for line in reversed(out) if "release" in line or "V1" in line), out[-1] if out else None)


def environment() -> dict:
    import torch
    import triton
    from triton import knobs

    nvcc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc"
    git = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": git.stdout.strip() or None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "ptxas (Triton's)": _tool_version([knobs.nvidia.ptxas.path, "--version"]),
        "cuobjdump": _tool_version([cuobjdump(), "--version"]),
        "nvcc (CUDA_HOME, builds vitops/_C)": _tool_version([str(nvcc), "--version"]),
        "sm_limits": {f"sm_{arch}": dataclasses.asdict(limits) for arch, limits in SM_LIMITS.items()},
    }


def roofline() -> list | None:
    """benchmarks/roofline.py's predictions (least time of each GPU benchmark row on an H100), if it exists."""
    try:
        module = importlib.import_module("benchmarks.roofline")
    except ModuleNotFoundError as error:
        if error.name != "benchmarks.roofline":
            raise
        return None
    return module.predictions() if hasattr(module, "predictions") else None


def _kib(n: int | None) -> str:
    return "?" if n is None else f"{n / 1024:.1f}K" if n >= 1024 else str(n)


def table(records: list[dict]) -> str:
    """One line per record: registers, spill and stack bytes, shared memory (static+dynamic), threads, blocks
    and occupancy per SM (and its limit), tensor-core SASS instructions. * marks a default configuration; !
    a spill or a 16-bit matrix kernel without tensor cores."""
    header = ("", "op", "kernel", "dtype", "config", "problem", "arch", "regs", "spill st/ld", "stack", "smem",
              "threads", "blocks", "occ", "limit", "tensor cores")  # fmt: skip
    rows = [header]
    for r in records:
        flag = ("!" if spills(r) or missing_tensor_cores(r) else "") + ("*" if r["default"] else "")
        tc = ",".join(f"{k}x{v}" for k, v in r["tensor_core_ops"].items())
        tc = tc or ("NONE" if r["needs_tensor_cores"] else "-")
        smem = _kib(r["static_shared"]) + ("+dyn" if r["dynamic_shared"] is None else f"+{_kib(r['dynamic_shared'])}")
        occ = "?" if r["occupancy"] is None else f"{r['occupancy']:.0%}"
        blocks = "?" if r["blocks_per_sm"] is None else r["blocks_per_sm"]
        spill = f"{r['spill_store_bytes']}/{r['spill_load_bytes']}"
        rows.append((flag, r["op"], r["kernel"], r["dtype"], r["config"], r.get("problem", ""), r["arch"],
                     r["registers"], spill, r["stack_bytes"], smem, r["threads"] or "?", blocks, occ,
                     r["limited_by"] or "", tc))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.static", description=__doc__.split("\n\n")[0])
    parser.add_argument("--defaults", action="store_true", help="only the default configurations")
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated: 80, 90")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--out", default=str(REPORT), help="the JSON report ('' for none)")
    parser.add_argument("--ptx-dir", default="", help="also write each Triton kernel's PTX here")
    parser.add_argument("--quiet", action="store_true", help="no table")
    args = parser.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",")]
    if args.ptx_dir:
        os.makedirs(args.ptx_dir, exist_ok=True)

    library = cuda_library()
    records = [r for r in cuda_records(library) if int(r["arch"][3:]) in archs] if library else []
    records += triton_records(archs, args.defaults, args.jobs, args.ptx_dir or None)
    records.sort(key=lambda r: (r["kind"], r["op"], r["kernel"], r["dtype"], r["arch"], r["config"]))
    report = {
        "environment": environment(),
        "library": str(library.relative_to(ROOT)) if library else None,
        "unlaunched_triton_kernels": unlaunched_kernels(),
        "kernels": records,
        "roofline": roofline(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    if not args.quiet:
        print(table(records))
        bad = [record_id(r) for r in records if r["default"] and (spills(r) or missing_tensor_cores(r))]
        print(f"\n{len(records)} kernels; default configurations that spill or lack tensor cores: {len(bad)}")
        for name in bad:
            print(f"  {name}")
        if args.out:
            print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
