"""The fast decode path for Llama-family models: a compact forward with fused projections, a slot KV cache,
weights in the precision measured fastest per batch size, optional int8/int4 weight-only quantization, and C
kernels for AVX2 CPUs where torch has no fast one (avx2.py, avx2_kernels.c). `supports(model)` says whether a
model can take it; otherwise the engine uses engine/runner.py."""

from engine.fast.model import supports
from engine.fast.runner import FastRunner

__all__ = ["FastRunner", "supports"]
