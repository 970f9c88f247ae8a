"""engine/fast/cpu_kernels.c, compiled for this machine on first use and loaded with ctypes.

Why C and not a torch extension: the kernels need no torch headers, so a build is one quick run of the
system's C compiler, and ctypes releases the GIL during each call. The library links libgomp by its soname;
torch has loaded its own libgomp under that name already, so the kernels run on the calling thread's OpenMP
team, the one torch's kernels use (a second OpenMP runtime would start a second team: see engine/openmp.py).

Built once per source and compiler flags into `<cache_root>/kernels/`. Where the CPU lacks AVX2 or FMA, no
compiler exists, or the build fails, `library()` says why in the log and returns None: the fast path then
runs on torch's kernels alone. ATEN_CPU_CAPABILITY, torch's own cap on the ISA of its CPU kernels, caps these
too: at avx2 (or default) they are built without AVX512, so that a benchmark can run an AVX512 machine as an
AVX2 one (bench/levers.py, bench/roofline.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch

from engine.fast.hugepages import Arena
from engine.loading import cache_root

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# No -march=native: the cached library must run on any AVX2 + FMA CPU that shares the cache directory.
# -ffp-contract=off: a product and a sum written apart stay apart (rounded twice, as torch's ops round them); the
# matmuls and attention ask for their FMAs by name.
FLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
# Added where the CPU has AVX512F: the matmul tiles then work on 16 features a register (cpu_kernels.c's
# __AVX512F__ branch), with bitwise the same results.
AVX512_FLAGS = [*FLAGS, "-mavx512f"]
# Added where the CPU has AVX512-BF16 too: the build then also has linear_bf16_pairs, bfloat16 weights and
# activations, and the layer stack can run it.
PAIRS_FLAGS = [*AVX512_FLAGS, "-mavx512bf16"]
# Added where the CPU has AMX-BF16 too (every such CPU has AVX512-BF16): the build then also has linear_amx_bf16,
# the prefill matmul on AMX tiles.
AMX_FLAGS = [*PAIRS_FLAGS, "-mamx-tile", "-mamx-bf16"]
WIDTH = 16  # output features per packed block: cpu_kernels.c's WIDTH
BF16_FORMAT, INT4_FORMAT, PAIRS_FORMAT = 0, 1, 3  # cpu_kernels.c's enum format: DecodeShape.format's values
INT4_GROUP = 32  # input features sharing an int4 scale and minimum: cpu_kernels.c's INT4_GROUP
_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
SIGNATURES = {  # cpu_kernels.c's functions: (argument types, result type)
    "linear_bf16": ([_P, _I64, _I64, _P, _I64, _P, _INT], None),
    "linear_int4": ([_P, _I64, _I64, _P, _P, _I64, _P, _INT], None),
    "rms_norm": ([_P, _P, _P, _I64, _I64, _F], None),
    "attention_decode": ([_P, _I64, _I64, _P, _P, _I64, _I64, _I64, _P, _P, *[_I64] * 5, _INT], _INT),
    "rope": ([_P, _I64, _I64, _I64, _I64, _P, _P, _P], None),
    "silu_mul": ([_P, _I64, _I64, _P], None),
    "decode_layers": ([_P, _I64, _P, _P, _P, _P, _P, _INT], _INT),
    "layout_entries": ([], _I64),  # the C boundary's description: check_layout
    "layout": ([], _P),
}
LAYER_WEIGHTS = ("qkv", "out", "gate_up", "down")  # a layer's matmuls, in struct decode_layer's order


class DecodeLayer(ctypes.Structure):  # cpu_kernels.c's struct decode_layer: engine/fast/stack.py fills it
    _fields_ = [
        *((f"{name}{part}", ctypes.c_void_p) for name in LAYER_WEIGHTS for part in ("", "_scales")),
        ("input_norm", ctypes.c_void_p),
        ("post_attention_norm", ctypes.c_void_p),
        ("kv", ctypes.c_void_p),
    ]


class DecodeShape(ctypes.Structure):  # cpu_kernels.c's struct decode_shape
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")),
        ("capacity", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("format", ctypes.c_int),
    ]



STRUCTS: dict[str, type[ctypes.Structure]] = {"decode_layer": DecodeLayer, "decode_shape": DecodeShape}
# cpu_kernels.c's #defines that this module's packing follows, and the formats of its enum that DecodeShape names
CONSTANTS = {"WIDTH": WIDTH, "INT4_GROUP": INT4_GROUP, "BF16": BF16_FORMAT, "INT4": INT4_FORMAT, "PAIRS": PAIRS_FORMAT}


class _LayoutEntry(ctypes.Structure):  # cpu_kernels.c's struct layout_entry
    _fields_ = [("name", ctypes.c_char_p), ("offset", ctypes.c_int64), ("size", ctypes.c_int64)]


class BoundaryMismatch(RuntimeError):
    """The ctypes mirror of cpu_kernels.c's structs or constants differs from what the compiled library reports."""


PAIRS_SIGNATURES = {"linear_bf16_pairs": ([_P, _I64, _I64, _P, _I64, _P, _INT], _INT)}  # with PAIRS_FLAGS
AMX_SIGNATURES = {  # only in a build with AMX_FLAGS
    "amx_permitted": ([], _INT),
    "linear_amx_bf16": ([_P, _I64, _I64, _P, _I64, _P, _INT], _INT),
}
AMX_K = 32  # inputs an AMX tile multiply takes: k of an AMX weight is a multiple
REQUIRED_CPU_FLAGS = ("avx2", "fma")


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, built with AVX512 (and AVX512-BF16, and AMX) where this CPU has it, or None (logged
    once, with the reason) where they cannot run here."""
    reason = unsupported()
    if reason is None:
        try:
            builds = []
            if avx512_allowed():
                has = cpu_flags()
                builds = [
                    *([AMX_FLAGS] if "amx_bf16" in has else []),
                    *([PAIRS_FLAGS] if "avx512_bf16" in has else []),
                    AVX512_FLAGS,
                ]
            for flags in builds:
                try:
                    return build(flags)
                except subprocess.CalledProcessError as error:  # e.g. a compiler without AVX512 or AMX
                    log.info("the kernels' build with %s failed, trying with less: %s", flags[-1], error.stderr[-2000:])
                except OSError as error:
                    log.info("the kernels' build with %s failed, trying with less: %s", flags[-1], error)
            return build(FLAGS)
        except subprocess.CalledProcessError as error:
            reason = f"building {SOURCE.name} failed: {error.stderr.strip()[-2000:]}"
        except (OSError, subprocess.TimeoutExpired) as error:
            reason = f"building or loading {SOURCE.name} failed: {error}"
    log.info("the C kernels (%s) not used: %s", SOURCE.name, reason)
    return None


def build(flags: list[str]) -> ctypes.CDLL:
    """The kernels compiled with `flags` (cached) and loaded, their signatures set."""
    kernels = ctypes.CDLL(str(compiled(SOURCE, flags)))
    signatures = (
        SIGNATURES
        | (PAIRS_SIGNATURES if "-mavx512bf16" in flags else {})
        | (AMX_SIGNATURES if flags == AMX_FLAGS else {})
    )
    for name, (argtypes, restype) in signatures.items():
        function = getattr(kernels, name)
        function.argtypes, function.restype = argtypes, restype
    check_layout(kernels)
    return kernels


def check_layout(
    kernels: ctypes.CDLL, structs: dict[str, type[ctypes.Structure]] = STRUCTS, constants: dict[str, int] = CONSTANTS
) -> None:
    """Raises BoundaryMismatch, naming every difference, unless the library's structs (size, each field's offset
    and size) and constants are those the ctypes structures and this module's constants describe. Not a fallback
    to torch's kernels: a mismatch is a source tree edited on one side only, which must fail where it is made."""
    entries = ctypes.cast(kernels.layout(), ctypes.POINTER(_LayoutEntry))
    in_c = {
        entry.name.decode(): (entry.offset, entry.size)
        for entry in (entries[index] for index in range(kernels.layout_entries()))
    }
    in_python = {name: (0, value) for name, value in constants.items()}
    for struct_name, struct in structs.items():
        in_python[struct_name] = (0, ctypes.sizeof(struct))
        for field_name, *_ in struct._fields_:
            field = getattr(struct, field_name)
            in_python[f"{struct_name}.{field_name}"] = (field.offset, field.size)

    def said(where: dict[str, tuple[int, int]], name: str) -> str:
        if name not in where:
            return "absent"
        offset, size = where[name]
        if "." in name:
            return f"offset {offset}, {size} bytes"
        return f"{size} bytes" if name in structs else f"{size}"

    differences = [
        f"{name}: {said(in_c, name)} in {SOURCE.name}, {said(in_python, name)} in {Path(__file__).name}"
        for name in sorted(in_c.keys() | in_python.keys())
        if in_c.get(name) != in_python.get(name)
    ]
    if differences:
        raise BoundaryMismatch(
            f"{SOURCE.name} and its ctypes mirror in {Path(__file__).name} disagree (a struct or constant changed "
            f"on one side only; change both): {'; '.join(differences)}"
        )


def pairs_ready() -> bool:
    """The kernels have the AVX512-BF16 matmul (linear_bf16_pairs)."""
    kernels = library()
    return kernels is not None and hasattr(kernels, "linear_bf16_pairs")


@cache
def amx_ready() -> bool:
    """The kernels have the AMX matmul and Linux lets this process use AMX tiles."""
    kernels = library()
    return kernels is not None and hasattr(kernels, "linear_amx_bf16") and kernels.amx_permitted() == 1


def packable(weight: torch.Tensor, int4: bool = False) -> bool:
    return weight.shape[0] % WIDTH == 0 and (not int4 or weight.shape[1] % INT4_GROUP == 0)


def pack_bf16(weight: torch.Tensor, arena: Arena) -> torch.Tensor:
    """[n, k] float weight -> bfloat16 [n / WIDTH, k, WIDTH]: blocks of WIDTH output features, k-major."""
    n, k = weight.shape
    return arena.copy(weight.detach().to(torch.bfloat16).view(n // WIDTH, WIDTH, k).transpose(1, 2))


def amx_packable(weight: torch.Tensor) -> bool:
    return weight.shape[0] % WIDTH == 0 and weight.shape[1] % AMX_K == 0


def pairs_packable(weight: torch.Tensor) -> bool:
    return weight.shape[0] % WIDTH == 0 and weight.shape[1] % WIDTH == 0


def pack_pairs(weight: torch.Tensor, arena: Arena) -> torch.Tensor:
    """[n, k] float weight -> bfloat16 [n / WIDTH, k / 2, WIDTH, 2]: per block of WIDTH output features, the pairs
    of inputs a VDPBF16PS lane or an AMX tile multiply takes, feature by feature."""
    n, k = weight.shape
    pairs = weight.detach().to(torch.bfloat16).view(n // WIDTH, WIDTH, k // 2, 2)
    return arena.copy(pairs.permute(0, 2, 1, 3))


def pack_int4(weight: torch.Tensor, arena: Arena) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] float weight -> (nibbles uint8 [n / WIDTH, k, WIDTH / 2], scales and minimums bfloat16
    [n / WIDTH, k / INT4_GROUP, 2, WIDTH]): asymmetric 4-bit per group of INT4_GROUP inputs, w = q * scale +
    minimum, q in 0..15. The codes are chosen against the bfloat16-rounded scale and minimum the kernel reads."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    minimum = groups.amin(dim=-1).to(torch.bfloat16)
    scale = ((groups.amax(dim=-1) - minimum.float()) / 15).clamp(min=1e-8).to(torch.bfloat16)
    codes = torch.round((groups - minimum.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    codes = codes.to(torch.uint8).reshape(n // WIDTH, 2, WIDTH // 2, k)  # feature 16 b + 8 h + j
    nibbles = (codes[:, 0] | (codes[:, 1] << 4)).transpose(1, 2)  # [b, k, j]
    per_block = torch.stack([scale, minimum], dim=-1).reshape(n // WIDTH, WIDTH, k // INT4_GROUP, 2)
    return arena.copy(nibbles), arena.copy(per_block.permute(0, 2, 3, 1))


def linear_int4(kernels: ctypes.CDLL, x: torch.Tensor, nibbles: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    """x [rows, k] float32, contiguous, times a pack_int4 weight transposed: [rows, n] float32."""
    rows, k = x.shape
    n = nibbles.shape[0] * WIDTH
    out = torch.empty(rows, n, dtype=torch.float32)
    kernels.linear_int4(
        x.data_ptr(), rows, k, nibbles.data_ptr(), scale_min.data_ptr(), n, out.data_ptr(), torch.get_num_threads()
    )
    return out


def linear_bf16(kernels: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [rows, k] float32, contiguous, times the packed weight transposed: [rows, n] float32."""
    rows, k = x.shape
    n = packed.shape[0] * WIDTH
    out = torch.empty(rows, n, dtype=torch.float32)
    kernels.linear_bf16(x.data_ptr(), rows, k, packed.data_ptr(), n, out.data_ptr(), torch.get_num_threads())
    return out


def linear_amx(kernels: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [rows, k] float32, contiguous, rounded to bfloat16, times a pack_pairs weight transposed on AMX tiles:
    [rows, n] float32."""
    return _rounding_linear(kernels, "linear_amx_bf16", x, packed)


def linear_pairs(kernels: ctypes.CDLL, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [rows, k] float32, contiguous, rounded to bfloat16, times a pack_pairs weight transposed with AVX512-BF16:
    [rows, n] float32."""
    return _rounding_linear(kernels, "linear_bf16_pairs", x, packed)


def _rounding_linear(kernels: ctypes.CDLL, name: str, x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    rows, k = x.shape
    n = packed.shape[0] * WIDTH
    out = torch.empty(rows, n, dtype=torch.float32)
    if getattr(kernels, name)(x.data_ptr(), rows, k, packed.data_ptr(), n, out.data_ptr(), torch.get_num_threads()):
        raise MemoryError(f"{name} could not allocate the bfloat16 copy of {rows} x {k} inputs")
    return out


def rms_norm(kernels: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm(x, (dim,), weight, eps) for float32 x [..., dim] and weight [dim]."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    kernels.rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps)
    return out


def attention_decode(
    kernels: ctypes.CDLL, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """SDPA of one query token per row, float32: q [rows, heads, head_dim] (any row and head strides) against
    keys and values [rows, kv_heads, positions, head_dim] (strided views of the cache, one layout for both),
    row r attending its first visible[r] positions (int64). Returns [rows, heads * head_dim]."""
    rows, heads, head_dim = q.shape
    kv_heads = keys.shape[1]
    if keys.stride() != values.stride() or q.stride(2) != 1 or keys.stride(3) != 1 or head_dim % 8:
        raise ValueError("attention_decode needs head_dim contiguous, a multiple of 8, one layout for keys and values")
    out = torch.empty(rows, heads * head_dim, dtype=torch.float32)
    status = kernels.attention_decode(
        q.data_ptr(), q.stride(0), q.stride(1),
        keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), keys.stride(2),
        visible.data_ptr(), out.data_ptr(),
        rows, heads, kv_heads, head_dim, keys.shape[2], torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError(f"attention_decode could not allocate its scores for {keys.shape[2]} positions")
    return out


def rope_(
    kernels: ctypes.CDLL, qkv: torch.Tensor, heads: int, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """model.rope_ on the first `heads` heads of each token of qkv [rows, tokens, all heads, head_dim] (float32,
    contiguous), in place; positions [rows, tokens] int64; cos and sin_signed float32 [max_len, head_dim]."""
    rows, tokens, all_heads, head_dim = qkv.shape
    if not (qkv.is_contiguous() and positions.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("rope_ needs contiguous tensors")
    if positions.dtype != torch.int64 or qkv.dtype != torch.float32:
        raise ValueError("rope_ needs int64 positions and a float32 qkv")
    kernels.rope(
        qkv.data_ptr(), rows * tokens, all_heads * head_dim, heads, head_dim, positions.data_ptr(), cos.data_ptr(),
        sin.data_ptr(),
    )  # fmt: skip


def silu_mul(kernels: ctypes.CDLL, gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate_up [..., 2n] float32 (gate, then up): [..., n]."""
    gate_up = gate_up.contiguous()
    n = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], n, dtype=torch.float32)
    kernels.silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * n), n, out.data_ptr())
    return out


def unsupported() -> str | None:
    """Why the kernels cannot run on this machine, or None."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{platform.machine()} is not x86-64"
    flags = cpu_flags()
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in flags]
    if missing:
        return f"this CPU lacks {', '.join(missing)}"
    if _compiler() is None:
        return "no C compiler (cc, gcc or $CC) on PATH"
    return None


def avx512_allowed() -> bool:
    """The CPU has AVX512F and torch's kernels are not capped below it."""
    return "avx512f" in cpu_flags() and os.environ.get("ATEN_CPU_CAPABILITY", "").lower() not in ("avx2", "default")


def cpu_flags() -> set[str]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _compiler() -> str | None:
    candidates = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc"]
    return next((path for name in candidates if (path := shutil.which(name))), None)


def compiled(source: Path, flags: list[str]) -> Path:
    """The shared library of a C source with these flags (`-shared -fPIC` among them), compiled on the first
    call. Written under a temporary name and renamed: processes starting at once each build, and none loads a
    half-written file."""
    compiler = _compiler()
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or $CC) on PATH")
    digest = hashlib.sha256(source.read_bytes() + " ".join([compiler, *flags]).encode()).hexdigest()[:16]
    directory = cache_root() / "kernels"
    target = directory / f"{source.stem}-{digest}.so"
    if target.is_file():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    descriptor, scratch = tempfile.mkstemp(dir=directory, suffix=".so")
    os.close(descriptor)
    try:
        subprocess.run(
            [compiler, *flags, "-o", scratch, str(source)], check=True, capture_output=True, text=True, timeout=120
        )
        os.replace(scratch, target)
    finally:
        Path(scratch).unlink(missing_ok=True)
    log.info("built %s", target)
    return target
