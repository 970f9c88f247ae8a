"""`python -m bench.roofline [--rows 189]`: how close a prefill's matmuls run to this CPU's floating-point roof.

A burst's time to first token is its prompts' prefill, and a prefill is compute bound: its 120 fused matmuls
(SmolLM2's 30 layers: QKV, output, gate+up, down) take most of it. This times them at `--rows` rows (189: the 7
prompts of 27 tokens a prefill group of the bench's burst holds) in each precision the fast path can prefill in
here, with the weights the fast path builds, float32 activations in and out as it runs them; and the FMA roof
(bench/fma_roof.c): the GFLOPS of float32 FMAs alone, on 1 thread and on torch's threads. Natively, then as an
AVX2-only CPU (bench.levers.AVX2_ENV) in a subprocess; prints and writes bench/roofline.md.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.levers import AVX2_ENV, load, run_isa
from engine.fast import cpu_kernels
from engine.fast.model import LlamaParts
from engine.fast.runner import candidate_precisions

OUTPUT = Path(__file__).resolve().parent / "roofline.md"
ROOF_SOURCE = Path(__file__).resolve().parent / "fma_roof.c"
ROOF_FLAGS = ["-O2", "-fopenmp", "-shared", "-fPIC"]  # the ISA is chosen per function (target attributes)
ROOF_ITERATIONS = 50_000_000  # about a quarter of a second per thread count
ROUNDS = 7  # the precisions alternate round by round; the median round counts
PROJECTIONS = [f"self_attn.{name}_proj" for name in "qkvo"] + [f"mlp.{name}_proj" for name in ("gate", "up", "down")]


def fma_roof() -> dict[str, float]:
    """GFLOPS of float32 FMAs alone: {"avx2 1 thread": ..., "avx2 N threads": ...} and the same for AVX512 where
    the CPU has it and torch is not capped below it."""
    library = ctypes.CDLL(str(cpu_kernels.compiled(ROOF_SOURCE, ROOF_FLAGS)))
    isas = ["avx2"] + (["avx512"] if cpu_kernels.avx512_allowed() else [])
    threads, sink, roof = torch.get_num_threads(), ctypes.c_float(), {}
    for isa in isas:
        function = getattr(library, f"{isa}_gflops")
        function.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.POINTER(ctypes.c_float)]
        function.restype = ctypes.c_double
        for count in sorted({1, threads}):
            roof[f"{isa} {count} thread{'s' if count > 1 else ''}"] = max(
                function(ROOF_ITERATIONS, count, ctypes.byref(sink)) for _ in range(3)
            )
    return roof


def prefill_matmuls(model, parts: LlamaParts, precision: str, rows: int) -> tuple[Callable[[], None], float]:
    """The 120 fused matmuls of one prefill forward of `rows` tokens in `precision`, and their FLOPs."""
    layers = parts.precision(precision).layers
    hidden = torch.randn(rows, model.config.hidden_size)
    wide = torch.randn(rows, model.config.intermediate_size)
    weights = sum(layer.get_submodule(name).weight.numel() for layer in model.model.layers for name in PROJECTIONS)

    def forward() -> None:
        for layer in layers:
            layer.qkv(hidden), layer.out(hidden), layer.gate_up(hidden), layer.down(wide)

    return forward, 2.0 * rows * weights


@torch.no_grad()
def measure(rows: int) -> dict:
    model, _ = load()
    parts = LlamaParts(model, 64, torch.device("cpu"), torch.float32)
    precisions = candidate_precisions("auto", "none", torch.device("cpu"))  # those `dtype: auto` times here
    runs = {name: prefill_matmuls(model, parts, name, rows) for name in precisions}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for forward, _ in runs.values():
        forward()  # warm-up
    for _ in range(ROUNDS):
        for name, (forward, _) in runs.items():
            started = time.perf_counter()
            forward()
            times[name].append(time.perf_counter() - started)
    matmuls = {
        name: {"ms": statistics.median(times[name]) * 1000, "gflops": flops / statistics.median(times[name]) / 1e9}
        for name, (_, flops) in runs.items()
    }
    return {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "rows": rows,
        "roof": fma_roof(),
        "matmuls": matmuls,
    }


def report(results: list[dict]) -> str:
    lines = [
        "# Prefill matmuls against the FMA roof (`python -m bench.roofline`)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. The 120 fused matmuls of one prefill forward of "
        f"{results[0]['rows']} tokens (SmolLM2-135M), median of {ROUNDS} rounds, precisions interleaved; the roof: "
        "float32 FMAs alone, best of 3 (bench/fma_roof.c).",
        "",
    ]
    for result in results:
        roof = result["roof"]
        avx2_all = roof[max((key for key in roof if key.startswith("avx2")), key=lambda key: int(key.split()[1]))]
        lines += [
            f"## torch capability {result['capability']}, {result['threads']} threads",
            "",
            "FMA roof: " + ", ".join(f"{key} {value:.0f} GFLOPS" for key, value in roof.items()),
            "",
            "| weights | ms | GFLOPS | of the AVX2 roof | ms a token |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, matmul in result["matmuls"].items():
            lines.append(
                f"| {name} | {matmul['ms']:.1f} | {matmul['gflops']:.0f} | {matmul['gflops'] / avx2_all:.0%} | "
                f"{matmul['ms'] / result['rows']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=189)
    parser.add_argument("--one", action="store_true", help="measure this process's ISA only and print JSON")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.rows)))
        return
    extra = ["--rows", str(args.rows)]
    text = report([run_isa({}, "bench.roofline", extra), run_isa(AVX2_ENV, "bench.roofline", extra)])
    OUTPUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
