"""The plain data a step's modules share: the model's shape, a layer's matmul weights, and where a step's tokens
come from and go. cache.py, stack.py and model.py all import this module, and it imports none of them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.fast.linear import Linear

RopeTables = tuple[torch.Tensor, torch.Tensor]  # cos and sign-folded sin per position: model.rope_tables


@dataclass(frozen=True)
class Shape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    eps: float

    @property
    def groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.heads // self.kv_heads


@dataclass
class LayerWeights:
    qkv: Linear  # q, k and v projections stacked: one matmul
    out: Linear
    gate_up: Linear  # gate and up projections stacked: one matmul
    down: Linear


@dataclass(frozen=True)
class LayerNorms:
    """Every layer's RMSNorm weights, float32 [hidden] each: the two of a layer and the model's last one."""

    inputs: list[torch.Tensor]
    post_attention: list[torch.Tensor]
    final: torch.Tensor


@dataclass
class StepInputs:
    """Where a forward's tokens come from and go: built once per step, shared by every layer."""

    input_ids: torch.Tensor  # [rows, tokens]
    positions: torch.Tensor  # [rows, tokens]: each token's position in its row (padding repeats the last one)
    slots: slice | torch.Tensor  # each row's cache slot: a slice when contiguous (decode), else an index
    write_at: tuple[torch.Tensor, torch.Tensor]  # slot and position of each real (non-padding) token: [written tokens]
    real_tokens: torch.Tensor | None  # [written tokens]: flat index of the real tokens, None when all are real
    attended: int  # cache positions the rows' queries read
    # Added to the attention scores, 0 where a key position <= the query's and -inf elsewhere, repeated for the
    # query heads that share a KV head: [rows, 1, groups * tokens, attended] ([rows, 1, 1, attended] when
    # decoding: it broadcasts). Float, built once per step: SDPA converts a boolean mask to this at every call
    # (30 times a step). None when every query reads every position (decoding rows of one length).
    mask: torch.Tensor | None
    last: torch.Tensor | None  # [rows]: index of the token whose logits each row needs; None: the only one
    output_order: torch.Tensor | None  # rows' order in the returned logits; None: as computed
    # A prefill's real tokens per row, None for a decode step. With more than one row, the matmuls whose result
    # depends on the batch (PrecisionKernels.batch_exact False) and the attention run row by row on exactly these
    # tokens: a prompt's prefill is then bitwise the same alone or in any group (_matmul, row_by_row_attention).
    counts: list[int] | None = None
