"""A decode step's whole layer stack in one call: cpu_kernels.c's decode_layers, for the precisions whose every matmul
is an Avx2Linear (bfloat16 or int4 weights widened in registers, or bfloat16 pairs with AVX512-BF16).

Why: with the C kernels a layer's work is small, and the Python between the kernels is not: model.py's
layers_forward makes about 25 torch calls a layer, each a dispatch of microseconds. decode_layers runs the same
kernels in the same order in C, so its result is bitwise the Python loop's with KernelOps (tests/test_fast_runner.py),
and a step makes one call for its layers (bench/levers.md times both: "layers from Python"). Prefill steps (many
tokens a row) keep the Python loop: their matmuls dwarf the calls.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import cast

import torch

from engine.fast import cpu_kernels
from engine.fast.cache import SlotCache
from engine.fast.linear import Avx2Linear
from engine.fast.step import LayerNorms, LayerWeights, RopeTables, Shape, StepInputs


class DecodeStack:
    """Runs every layer of a decode step on one model's weights in one precision, in place on the residual
    stream. It holds raw pointers, and references to the weights and norms they point into; the KV cache's
    pointers are checked at every call (the cache grows into new buffers) and hold no reference."""

    def __init__(
        self, shape: Shape, layers: Sequence[LayerWeights], norms: LayerNorms, rope_tables: RopeTables
    ) -> None:
        kernels = cpu_kernels.library()
        assert kernels is not None, "DecodeStack.build checks that the kernels run"
        self.kernels = kernels
        self.rope_tables = rope_tables
        self._pointed_to = (list(layers), norms)
        first = cast(Avx2Linear, layers[0].qkv)
        intermediate = cast(Avx2Linear, layers[0].down).in_features
        self.shape = cpu_kernels.DecodeShape(
            layers=len(layers), hidden=shape.hidden, heads=shape.heads, kv_heads=shape.kv_heads,
            head_dim=shape.head_dim, intermediate=intermediate, capacity=0, eps=shape.eps, format=first.format,
        )  # fmt: skip
        self.layers = (cpu_kernels.DecodeLayer * len(layers))()
        layer_norms = zip(norms.inputs, norms.post_attention)
        for entry, layer, (input_norm, post_norm) in zip(self.layers, layers, layer_norms):
            for name in cpu_kernels.LAYER_WEIGHTS:
                weight, scales = cast(Avx2Linear, getattr(layer, name)).pointers()
                setattr(entry, name, weight)
                setattr(entry, f"{name}_scales", scales)
            entry.input_norm, entry.post_attention_norm = input_norm.data_ptr(), post_norm.data_ptr()
        self._kv_pointers: list[int] = []  # the cache buffers' addresses the layers hold

    @classmethod
    def build(
        cls, shape: Shape, layers: Sequence[LayerWeights], norms: LayerNorms, rope_tables: RopeTables
    ) -> DecodeStack | None:
        """The stack, or None where decode_layers cannot run these weights: a matmul left on torch's kernels
        (a shape the AVX2 kernels do not pack), formats that differ between matmuls, or heads the attention
        kernel does not take (head_dim a multiple of 8)."""
        linears = [getattr(layer, name) for layer in layers for name in cpu_kernels.LAYER_WEIGHTS]
        if cpu_kernels.library() is None or shape.head_dim % 8 or not all(isinstance(x, Avx2Linear) for x in linears):
            return None
        if len({type(linear) for linear in linears}) != 1:
            return None
        if len({cast(Avx2Linear, layer.down).in_features for layer in layers}) != 1:
            return None
        tensors = [*norms.inputs, *norms.post_attention, *rope_tables]
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
            return None
        return cls(shape, layers, norms, rope_tables)

    @staticmethod
    def can_run(step: StepInputs) -> bool:
        """Whether this step is one decode_layers computes: one token a row, the rows in slots 0 .. rows - 1."""
        rows, tokens = step.input_ids.shape
        return tokens == 1 and isinstance(step.slots, slice) and step.slots == slice(0, rows)

    def __call__(self, x: torch.Tensor, cache: SlotCache, step: StepInputs) -> None:
        """x [rows, 1, hidden] float32, the embedded tokens: through every layer, in place; writes each row's K
        and V into the cache at its position."""
        if not x.is_contiguous() or x.dtype != torch.float32:
            raise ValueError("the decode stack needs a contiguous float32 residual stream")
        pointers = [kv.data_ptr() for kv in cache.kv]
        if pointers != self._kv_pointers:  # the cache was grown: new buffers
            for entry, kv in zip(self.layers, cache.kv):
                if kv.dtype != torch.float32 or not kv.is_contiguous():
                    raise ValueError("the decode stack needs a contiguous float32 KV cache")
                entry.kv = kv.data_ptr()
            self._kv_pointers = pointers
        self.shape.capacity = cache.capacity
        positions = step.positions.to(torch.int64).contiguous()
        cos, sin_signed = self.rope_tables
        status = self.kernels.decode_layers(
            x.data_ptr(), x.shape[0], positions.data_ptr(), self.layers, ctypes.byref(self.shape), cos.data_ptr(),
            sin_signed.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if status == -2:
            raise ValueError(f"a row's position is outside the KV cache's {cache.capacity} positions")
        if status != 0:
            raise MemoryError(f"the decode stack could not allocate its scratch memory for {x.shape[0]} rows")
