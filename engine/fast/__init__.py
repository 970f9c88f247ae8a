"""The fast decode path for Llama-family models: a compact forward with fused projections, a slot KV cache,
weights in the precision measured fastest per batch size, optional int8/int4 weight-only quantization, and C
kernels for x86 CPUs (AVX2, AVX512, AMX) where torch has no fast one (cpu_kernels.py, cpu_kernels.c).
`supports(model)` says whether a model can take it; otherwise the engine uses engine/runner.py."""

from engine.fast.model import supports
from engine.fast.runner import FastRunner

__all__ = ["FastRunner", "supports"]
