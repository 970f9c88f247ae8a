"""Weight formats of a linear layer without bias: y = x @ W.T, for x of shape [..., in_features].

Activations stay in one dtype through the forward (float32 on CPU); each format casts them to what its kernel
wants and its output back. On CPU the casts are cheap next to the matmuls: they touch [rows, features], the
matmul touches the whole weight.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

import torch
import torch.nn.functional as F

from engine.fast import cpu_kernels
from engine.fast.hugepages import Arena
from workarounds import torch_cpu_ops

QUANTIZATIONS = ("none", "int8", "int4")
AVX2_BFLOAT16 = "bfloat16-avx2"  # the precision name of bfloat16 weights through the AVX2 kernels
AVX2_INT4 = "int4-avx2"  # and of int4 weights through them
AVX2_PRECISIONS = (AVX2_BFLOAT16, AVX2_INT4)
# bfloat16 weights and activations with AVX512-BF16's pair products (the same C library): decode steps and prefills
AVX512_BFLOAT16 = "bfloat16-avx512bf16"
AMX_BFLOAT16 = "bfloat16-amx"  # bfloat16 weights and activations on AMX tiles (the same C library): prefills
# the precisions whose matmuls run on engine/fast/cpu_kernels.c, each row computed as it would be alone
C_PRECISIONS = (*AVX2_PRECISIONS, AVX512_BFLOAT16, AMX_BFLOAT16)
PRECISIONS = ("float32", "bfloat16", "float16", "int8", "int4", *C_PRECISIONS)  # every name make_linear takes
INT4_GROUP_SIZE = 32  # 32 input weights share a scale and a zero: the finest group the kernel takes, the most accurate
INT4_INNER_K_TILES = 2
PACKED_FOR_ROWS = 16  # the batch the pre-packed bfloat16 layout is tuned for (1 or 16 pack alike)


class Linear(Protocol):
    # Whether each row's result is the same whatever rows share the call (bitwise): true of the C kernels (one
    # lane or tile lane per output, summing in a fixed order); torch's matmuls (MKL, oneDNN) block by the row count.
    batch_exact: bool

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class DenseLinear:
    """A float weight (float32, bfloat16 or float16) and the fastest matmul this CPU has for it (bench/levers.md,
    "Earlier measurements"):

    - one row of 16-bit activations: torch.mv, aten's matrix-vector kernel, faster than F.linear's gemm for a
      single row;
    - more rows of bfloat16: the weight pre-packed in oneDNN's blocked layout, where this CPU's oneDNN has a
      bfloat16 matmul, which saves oneDNN's reorder at every call. It is a second copy of the weight (+2 bytes a
      parameter), kept because at one row torch.mv on the plain layout is faster still;
    - otherwise F.linear. float32 keeps MKL's gemm, whose results the float32 tests compare with transformers'.
    """

    batch_exact = False

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype) -> None:
        self.weight = weight.detach().to(dtype).contiguous()
        on_cpu = self.weight.device.type == "cpu"
        self.one_row_mv = dtype != torch.float32 and on_cpu
        self.packed = onednn_packed(self.weight) if dtype == torch.bfloat16 and on_cpu else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == self.weight.dtype:
            return self._matmul(x)
        return self._matmul(x.to(self.weight.dtype)).to(x.dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.one_row_mv and x.numel() == x.shape[-1]:
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], -1)
        if self.packed is not None:
            return torch_cpu_ops.onednn_linear(x, self.packed)
        return F.linear(x, self.weight)


class KernelLinear:
    """A weight through engine/fast/cpu_kernels.c, packed into an Arena (huge pages: engine/fast/hugepages.py):
    float32 activations in and out, each row computed as it would be alone."""

    batch_exact = True

    def __init__(self, kernels: ctypes.CDLL, weight: torch.Tensor) -> None:
        self.kernels, self.in_features = kernels, weight.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self._product(x.reshape(-1, self.in_features).to(torch.float32).contiguous())
        return out.to(x.dtype).view(*x.shape[:-1], -1)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Avx2Linear(KernelLinear):
    """A weight in a format the C layer stack runs too (engine/fast/stack.py): `format` is its cpu_kernels.c enum
    value, `pointers()` what struct decode_layer holds of it. Only for weights with a multiple of cpu_kernels.WIDTH
    rows (and of the columns `fits` asks for): make_linear checks."""

    format = cpu_kernels.BF16_FORMAT

    def __init__(self, weight: torch.Tensor) -> None:
        kernels = cpu_kernels.library()
        if kernels is None or not self.fits(weight) or weight.device.type != "cpu":
            raise ValueError(f"the {type(self).__name__} kernel cannot run a {tuple(weight.shape)} weight here")
        super().__init__(kernels, weight)

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return cpu_kernels.packable(weight)

    def pointers(self) -> tuple[int, int | None]:
        """The packed weight's address and its scales' (None: a format without)."""
        raise NotImplementedError


class Avx2Bf16Linear(Avx2Linear):
    """bfloat16 weights widened to float32 in registers: half of float32's bytes to read, where an AVX2 CPU's torch
    has no fast bfloat16 matmul (its own emulates bfloat16 and loses to float32 beyond one row: bench/levers.md)."""

    def __init__(self, weight: torch.Tensor, arena: Arena) -> None:
        super().__init__(weight)
        self.packed = cpu_kernels.pack_bf16(weight, arena)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_bf16(self.kernels, x, self.packed)

    def pointers(self) -> tuple[int, int | None]:
        return self.packed.data_ptr(), None


class Avx512Bf16Linear(Avx2Linear):
    """bfloat16 weights and activations (rounded as torch's bfloat16 matmul rounds them), the products of each pair
    of inputs summed in float32 by one AVX512-BF16 instruction: twice a float32 FMA's multiplies, so prefills run
    up to twice as fast, and the same bytes to read as Avx2Bf16Linear for a decode step."""

    format = cpu_kernels.PAIRS_FORMAT

    def __init__(self, weight: torch.Tensor, arena: Arena) -> None:
        if not cpu_kernels.pairs_ready():
            raise ValueError("the AVX512-BF16 kernel is not built here: the CPU or the compiler lacks AVX512-BF16")
        super().__init__(weight)
        self.packed = cpu_kernels.pack_pairs(weight, arena)

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return cpu_kernels.pairs_packable(weight)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_pairs(self.kernels, x, self.packed)

    def pointers(self) -> tuple[int, int | None]:
        return self.packed.data_ptr(), None


class Avx2Int4Linear(Avx2Linear):
    """int4 weights, asymmetric per group of 32 inputs as Int4Linear (and llama.cpp's Q4_1), a quarter of
    bfloat16's bytes to read: a memory-bound step reads less."""

    format = cpu_kernels.INT4_FORMAT

    def __init__(self, weight: torch.Tensor, arena: Arena) -> None:
        super().__init__(weight)
        self.nibbles, self.scale_min = cpu_kernels.pack_int4(weight, arena)

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return cpu_kernels.packable(weight, int4=True)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_int4(self.kernels, x, self.nibbles, self.scale_min)

    def pointers(self) -> tuple[int, int | None]:
        return self.nibbles.data_ptr(), self.scale_min.data_ptr()


class AmxBf16Linear(KernelLinear):
    """bfloat16 weights on AMX tiles (cpu_kernels.c's linear_amx_bf16), the activations rounded to bfloat16 as
    torch's bfloat16 matmul rounds them, the products summed in float32. Unlike oneDNN's bfloat16 matmul, a row's
    result does not depend on the rows beside it, for about its speed in a prefill (bench/roofline.md). Not an
    Avx2Linear: DecodeStack runs those, on their own packing."""

    def __init__(self, weight: torch.Tensor, arena: Arena) -> None:
        kernels = cpu_kernels.library()
        if (
            kernels is None
            or not cpu_kernels.amx_ready()
            or not cpu_kernels.amx_packable(weight)
            or weight.device.type != "cpu"
        ):
            raise ValueError(f"the AMX kernel cannot run a {tuple(weight.shape)} weight on this machine")
        super().__init__(kernels, weight)
        self.packed = cpu_kernels.pack_pairs(weight, arena)

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.linear_amx(self.kernels, x, self.packed)


def onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """A bfloat16 weight in oneDNN's blocked layout for matmuls of about PACKED_FOR_ROWS rows (any count runs);
    None where oneDNN has no bfloat16 matmul on this CPU (it needs AVX512BW or AVX-NE-CONVERT: not on AVX2)."""
    return torch_cpu_ops.onednn_pack(weight, PACKED_FOR_ROWS)


class Int8Linear:
    """Weight-only int8: one symmetric scale per output channel, aten's int8 weight-pack kernel.

    The kernel is several times faster with bfloat16 activations than with float32 ones on CPU (bench/levers.md,
    "Earlier measurements"), so it is fed bfloat16."""

    activation_dtype = torch.bfloat16
    batch_exact = False

    def __init__(self, weight: torch.Tensor) -> None:
        torch_cpu_ops.int8_verified()
        weight = weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.weight = torch.round(weight / scales[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        self.scales = scales.to(self.activation_dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.activation_dtype)
        out = torch_cpu_ops.int8_weight_mm(flat, self.weight, self.scales)
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


class Int4Linear:
    """Weight-only int4, asymmetric per group of INT4_GROUP_SIZE input weights, aten's CPU int4 kernel
    (`_weight_int4pack_mm_for_cpu`), fed bfloat16 activations."""

    activation_dtype = torch.bfloat16
    batch_exact = False

    def __init__(self, weight: torch.Tensor) -> None:
        weight = weight.detach().float()
        out_features, in_features = weight.shape
        groups = weight.reshape(out_features, in_features // INT4_GROUP_SIZE, INT4_GROUP_SIZE)
        low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
        scales = (high - low).clamp(min=1e-8) / 15
        quantized = torch.round((groups - low) / scales).clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
        # The kernel dequantizes (q - 8) * scale + zero, so the zero point is the value of q = 8.
        zeros = low + 8 * scales
        self.scales_and_zeros = (
            torch.stack([scales.squeeze(-1).t(), zeros.squeeze(-1).t()], dim=-1).contiguous().to(self.activation_dtype)
        )
        self.weight = torch_cpu_ops.int4_pack(quantized, INT4_INNER_K_TILES)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(self.activation_dtype)
        out = torch_cpu_ops.int4_weight_mm(flat, self.weight, INT4_GROUP_SIZE, self.scales_and_zeros)
        return out.to(x.dtype).reshape(*x.shape[:-1], -1)


def make_linear(precision: str, weight: torch.Tensor, arena: Arena) -> Linear:
    """A weight in a precision's format: float32, bfloat16, float16, int8, int4 or one of C_PRECISIONS (packed into
    `arena`). A weight whose shape a kernel does not take falls back: int4 to int8, the C kernels' to torch's."""
    if precision == "int8":
        return Int8Linear(weight)
    if precision == "int4":
        return Int4Linear(weight) if int4_fits(weight) else Int8Linear(weight)
    if precision == AVX2_BFLOAT16:
        return Avx2Bf16Linear(weight, arena) if cpu_kernels.packable(weight) else DenseLinear(weight, torch.bfloat16)
    if precision == AVX2_INT4:
        return Avx2Int4Linear(weight, arena) if Avx2Int4Linear.fits(weight) else make_linear("int4", weight, arena)
    if precision == AVX512_BFLOAT16:
        return (
            Avx512Bf16Linear(weight, arena) if Avx512Bf16Linear.fits(weight) else DenseLinear(weight, torch.bfloat16)
        )
    if precision == AMX_BFLOAT16:
        return AmxBf16Linear(weight, arena) if cpu_kernels.amx_packable(weight) else DenseLinear(weight, torch.bfloat16)
    return DenseLinear(weight, getattr(torch, precision))


def int4_fits(weight: torch.Tensor) -> bool:
    return weight.shape[1] % INT4_GROUP_SIZE == 0 and weight.shape[0] % 8 == 0


def check_quantization(quantization: str, device: torch.device) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: use one of {', '.join(QUANTIZATIONS)}")
    if quantization != "none" and device.type != "cpu":
        raise ValueError(f"quantization {quantization!r} uses CPU kernels: use 'none' on {device.type}")
    if quantization == "int4" and not torch_cpu_ops.int4_available():
        raise ValueError("quantization 'int4' needs torch's CPU int4 ops, missing in this torch: use none or int8")
