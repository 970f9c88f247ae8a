"""torch's private CPU matmul ops, which the fast path's weight formats (engine/fast/linear.py) and the lever
benchmarks (bench/levers.py) call. torch has no public API that packs a weight once and multiplies by it many
times, nor a public weight-only int8 or int4 matmul on CPU; these ops are what torch's own inductor and torchao
emit for those cases, and their names and arguments have changed between torch releases.

- oneDNN's pre-packed matmul: `torch.ops.mkldnn._reorder_linear_weight(weight, rows)` packs a bfloat16 weight in
  oneDNN's blocked layout for matmuls of about `rows` rows, `torch.ops.mkldnn._linear_pointwise(x, packed, None,
  "none", [], "")` multiplies by it, and `torch.ops.mkldnn._is_mkldnn_bf16_supported()` says whether oneDNN has a
  bfloat16 matmul on this CPU (`onednn_pack`, `onednn_linear`).
- Weight-only int8: `torch._weight_int8pack_mm(x, weight, scales)`, an int8 weight with one scale per output
  channel (`int8_weight_mm`).
- Weight-only int4: `torch._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)` packs codes 0..15, and
  `torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)` multiplies by them, dequantizing
  (q - 8) * scale + zero (`int4_available`, `int4_pack`, `int4_weight_mm`).
- MKL's pre-packed float32 matmul, for bench/levers.py only: `torch.ops.mkl._mkl_reorder_linear_weight(weight,
  rows)` and `torch.ops.mkl._mkl_linear(x, packed, weight, None, rows)` (`mkl_pack`, `mkl_linear`).

The functions that pack a weight check the torch version first (UnverifiedVersion); the matmuls run on what they
packed, so they do not check again. tests/test_fast_runner.py -k "dense_weight or quantized" proves every op on a
new torch: the packed products against F.linear, and the int8 and int4 greedy tokens against float32's.
"""

from __future__ import annotations

from functools import cache

import torch

from workarounds.versions import require_verified

VERIFIED: dict[str, tuple[str, ...]] = {"torch": ("2.13",)}
TEST = 'tests/test_fast_runner.py -k "dense_weight or quantized"'


def install() -> None:
    """Check that this torch is one the ops were verified on (UnverifiedVersion if not). Nothing is patched."""
    require_verified(__name__, VERIFIED, TEST)


@cache
def _verified() -> None:
    """install(), once a process: the packers call it for every weight."""
    install()


def onednn_pack(weight: torch.Tensor, rows: int) -> torch.Tensor | None:
    """A bfloat16 weight [n, k] in oneDNN's blocked layout for matmuls of about `rows` rows (any count runs), or
    None where oneDNN has no bfloat16 matmul on this CPU (it needs AVX512BW or AVX-NE-CONVERT)."""
    _verified()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, rows)
    except RuntimeError:  # an ISA check of oneDNN's own, stricter than the one above
        return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [..., k] (the packed weight's dtype) times an onednn_pack weight transposed: [..., n]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def int8_weight_mm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [rows, k] (bfloat16) times int8 weight [n, k] transposed, each output channel times its scale [n]."""
    return torch._weight_int8pack_mm(x, weight, scales)


def int8_verified() -> None:
    """What an int8 weight checks when it is built: its matmul is int8_weight_mm, on a plain int8 tensor."""
    _verified()


def int4_available() -> bool:
    """This torch has the CPU int4 ops (the `_for_cpu` names)."""
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def int4_pack(codes: torch.Tensor, inner_k_tiles: int) -> torch.Tensor:
    """int32 codes 0..15 [n, k] in the layout int4_weight_mm reads."""
    _verified()
    return torch._convert_weight_to_int4pack_for_cpu(codes, inner_k_tiles)


def int4_weight_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor
) -> torch.Tensor:
    """x [rows, k] (bfloat16) times an int4_pack weight transposed, each group of `group_size` inputs
    dequantized (q - 8) * scale + zero (scales_and_zeros [k / group_size, n, 2])."""
    return torch._weight_int4pack_mm_for_cpu(x, packed, group_size, scales_and_zeros)


def mkl_pack(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A float32 weight [n, k] in MKL's packed layout for matmuls of `rows` rows (bench/levers.py)."""
    _verified()
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)


def mkl_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [rows, k] float32 (the rows mkl_pack was given) times the packed weight transposed: [rows, n]."""
    return torch.ops.mkl._mkl_linear(x, packed, weight, None, x.shape[0])
