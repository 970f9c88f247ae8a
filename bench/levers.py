"""What each lever of the fast decode path (engine/fast/) is worth: ms per decode step at 1 and 16 rows for the
transformers path and the fast runner per precision, matmul-level levers alone, and the greedy-token
agreement of the quantized modes with float32.

    python -m bench.levers            # native, then with AVX2 only (AVX2_ENV: torch, oneDNN, MKL, the kernels)
                                      # in a subprocess; prints and writes bench/levers.md

Every figure of one ISA comes from one process, configurations interleaved round by round (the host is
shared: a burst of load hits them alike); each is the median of its steps, the best beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from engine.fast import FastRunner, cpu_kernels
from engine.fast.linear import AVX2_PRECISIONS, DenseLinear
from engine.fast.model import PrecisionKernels
from engine.loading import embedded_model_dir
from engine.plan import PrefillChunk, PrefillPlan
from workarounds import torch_cpu_ops

OUTPUT = Path(__file__).resolve().parent / "levers.md"
# An AVX2-only CPU, emulated: torch's kernels (and with them the C kernels' build: engine/fast/cpu_kernels.py),
# oneDNN's and MKL's capped at AVX2. Without MKL's cap, its float32 matmuls ran on AVX512 (147 against 126 GFLOPS
# at 189 rows).
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
ROWS = (1, 16)
CONTEXT = 128  # cached positions per row before the timed steps
ROUNDS, STEPS_PER_ROUND = 4, 3
AGREEMENT_STEPS = 64
AGREEMENT_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
    "List three colours:",
    "What is 12 times 7?",
    "The quick brown fox",
    "Water boils at",
    "import numpy as np\n",
    "The best way to learn a language is",
    "Dear Sir or Madam,",
    "In 1969, the first humans",
    "A haiku about autumn:",
    "The three laws of thermodynamics are",
    "SELECT name FROM users WHERE",
    "My favourite recipe for pancakes:",
    "Photosynthesis is the process by which",
]


def load():
    directory = embedded_model_dir()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(directory)


# -- decode steps, one callable per configuration ---------------------------------------------------------------


def transformers_steps(model, rows: int) -> Callable[[], None]:
    """The transformers runner's decode: the HF forward with a DynamicCache (CONTEXT zero positions per row to
    start) and a mask grown by a cat per step."""
    config = model.config
    cache = DynamicCache(config=config)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cached = torch.zeros(rows, config.num_key_value_heads, CONTEXT, head_dim, dtype=model.dtype)
    for layer in range(config.num_hidden_layers):
        cache.update(cached.clone(), cached.clone(), layer)
    state = {"mask": torch.ones(rows, CONTEXT, dtype=torch.long), "position": CONTEXT}

    def step() -> None:
        state["mask"] = torch.cat([state["mask"], torch.ones(rows, 1, dtype=torch.long)], dim=1)
        model(
            input_ids=torch.zeros(rows, 1, dtype=torch.long),
            attention_mask=state["mask"],
            position_ids=torch.full((rows, 1), state["position"]),
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        state["position"] += 1

    return step


def fast_steps(runner: FastRunner, rows: int) -> Callable[[], None]:
    """Rows with CONTEXT cached positions each (zeros: a prefill of 16 x 128 tokens would cost more time than
    every timed step, and the values do not change a step's cost)."""
    runner.reset()
    ids = [f"row{row}" for row in range(rows)]
    runner.cache.reserve(CONTEXT + ROUNDS * STEPS_PER_ROUND + 2)
    for rid in ids:
        runner.cache.advance(runner.cache.allocate(rid), CONTEXT)
    runner.cache.join(ids)
    return lambda: runner.decode(ids, [0] * rows)


def interleaved(configurations: dict[str, Callable[[], None]]) -> dict[str, dict[str, float]]:
    times: dict[str, list[float]] = {name: [] for name in configurations}
    for step in configurations.values():
        step()  # warm-up
    for _ in range(ROUNDS):
        for name, step in configurations.items():
            for _ in range(STEPS_PER_ROUND):
                started = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: {"median": statistics.median(values), "best": min(values)} for name, values in times.items()}


# -- matmul-level levers ------------------------------------------------------------------------------------------


class MklPackedLinear:
    """float32 weight pre-packed by MKL for a fixed row count (inductor's freezing path on CPU)."""

    batch_exact = False

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        self.weight, self.rows = weight, rows
        self.packed = torch_cpu_ops.mkl_pack(weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch_cpu_ops.mkl_linear(flat, self.packed, self.weight).reshape(*x.shape[:-1], -1)


class OneDnnPackedLinear:
    """bfloat16 weight pre-packed by oneDNN for the row count, one row too (needs AVX512BW or AVX-NE-CONVERT: the
    fast path's own bfloat16 packs for more than one row and runs one row through torch.mv)."""

    batch_exact = False

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        packed = torch_cpu_ops.onednn_pack(weight.to(torch.bfloat16), rows)
        if packed is None:
            raise RuntimeError("oneDNN has no bfloat16 matmul on this CPU")
        self.packed = packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch_cpu_ops.onednn_linear(x.to(torch.bfloat16), self.packed)
        return out.to(x.dtype)


def packed(precision: PrecisionKernels, kind: type, rows: int) -> PrecisionKernels | None:
    """A copy of a float precision with every matmul weight pre-packed; None where this CPU cannot."""
    try:
        layers = [
            type(layer)(
                *(kind(getattr(layer, name).weight.float(), rows) for name in ("qkv", "out", "gate_up", "down"))
            )
            for layer in precision.layers
        ]
        return PrecisionKernels(f"{precision.name} {kind.__name__}", layers, precision.lm_head)
    except RuntimeError as error:
        print(f"{kind.__name__}: {str(error).splitlines()[0]}", file=sys.stderr)
        return None


class SkippedLinear:
    """No matmul: a preallocated output of the right shape. A fast step with these is the rest of the step:
    norms, RoPE, the cache writes, attention, activations, the runner's and the forward's Python."""

    batch_exact = True  # a decode step's timing: nothing runs row by row

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        self.output = torch.zeros(rows, weight.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.output.view(*x.shape[:-1], -1)


def without_matmuls(precision: PrecisionKernels, rows: int) -> PrecisionKernels:
    layers = [
        type(layer)(*(SkippedLinear(getattr(layer, name).weight, rows) for name in ("qkv", "out", "gate_up", "down")))
        for layer in precision.layers
    ]
    return PrecisionKernels("no matmuls", layers, SkippedLinear(precision.lm_head.weight, rows))


def layer_matmuls(model, dtype: torch.dtype, rows: int, fused: bool) -> Callable[[], None]:
    """All the layers' projections of one decode step, alone: 7 per layer, or 4 with QKV and gate+up fused."""
    linears = []
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups = [
            [attention.q_proj, attention.k_proj, attention.v_proj],
            [attention.o_proj],
            [mlp.gate_proj, mlp.up_proj],
            [mlp.down_proj],
        ]
        for group in groups:
            weights = [module.weight for module in group]
            linears += [DenseLinear(torch.cat(weights), dtype)] if fused else [DenseLinear(w, dtype) for w in weights]
    x = torch.randn(rows, model.config.hidden_size, dtype=dtype)
    wide = torch.randn(rows, model.config.intermediate_size, dtype=dtype)

    def step() -> None:
        for linear in linears:
            linear(wide if linear.weight.shape[1] == wide.shape[1] else x)

    return step


def lm_head_matmul(model, dtype: torch.dtype, rows: int) -> Callable[[], None]:
    weight, x = model.lm_head.weight.detach().to(dtype), torch.randn(rows, model.config.hidden_size, dtype=dtype)
    return lambda: F.linear(x, weight)


# -- agreement -------------------------------------------------------------------------------------------------------


def greedy(runner: FastRunner, prompts: list[list[int]], forced: list[list[int]] | None = None) -> list[list[int]]:
    """Each row's greedy tokens; with `forced`, the tokens fed back are forced's (teacher forcing)."""
    ids = [f"p{index}" for index in range(len(prompts))]
    logits = runner.prefill(
        PrefillPlan([PrefillChunk(rid, prompt, 0) for rid, prompt in zip(ids, prompts)], True, True)
    )
    picked = [logits.argmax(-1).tolist()]
    for step in range(AGREEMENT_STEPS - 1):
        fed = picked[-1] if forced is None else [tokens[step] for tokens in forced]
        picked.append(runner.decode(ids, fed).argmax(-1).tolist())
    runner.free(ids)
    return [list(row) for row in zip(*picked)]


def agreement(model, tokenizer) -> dict[str, dict[str, float]]:
    prompts = [tokenizer(prompt).input_ids for prompt in AGREEMENT_PROMPTS]
    reference_runner = started(model, "float32")
    reference = greedy(reference_runner, prompts)
    results = {}
    for name in ("bfloat16", "int8", "int4", *(AVX2_PRECISIONS if cpu_kernels.library() else ())):
        runner = started(model, name)
        forced = greedy(runner, prompts, forced=reference)
        free_running = greedy(runner, prompts)
        same = sum(a == b for row, ref in zip(forced, reference) for a, b in zip(row, ref))
        prefix = [
            next((i for i, (a, b) in enumerate(zip(row, ref)) if a != b), AGREEMENT_STEPS)
            for row, ref in zip(free_running, reference)
        ]
        results[name] = {
            "teacher_forced": same / (len(prompts) * AGREEMENT_STEPS),
            "identical_sequences": sum(length == AGREEMENT_STEPS for length in prefix) / len(prompts),
            "mean_identical_prefix": statistics.mean(prefix),
        }
    return results


def started(model, precision: str | None, rows: int = 16) -> FastRunner:
    """A fast runner in one precision (engine/fast/linear.py's make_linear names), or as `dtype: auto` chooses
    (None)."""
    runner = FastRunner(model, rows, 1024, candidates=[precision] if precision else None)
    runner.start()
    return runner


# -- one ISA, in this process ----------------------------------------------------------------------------------------


@torch.no_grad()
def measure(with_agreement: bool) -> dict:
    model, tokenizer = load()
    bf16_model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=torch.bfloat16).eval()
    results: dict = {"capability": torch.backends.cpu.get_cpu_capability(), "load_before": os.getloadavg()[0]}
    auto = started(model, None)
    results["auto"] = auto.decode_precision.name if auto.decode_precision else None
    results["auto_prefill"] = auto.prefill_precision.name if auto.prefill_precision else None
    del auto
    runners = {f"fast {name}": started(model, name) for name in ("float32", "bfloat16", "int8", "int4")}
    if cpu_kernels.library() is not None:
        for name in AVX2_PRECISIONS:
            short = name.removesuffix("-avx2")
            runners[f"fast {short}, AVX2 kernels"] = started(model, name)
            # the same kernels called layer by layer from Python: what the one C call for the layers saves
            runner = runners[f"fast {short}, AVX2 kernels, layers from Python"] = started(model, name)
            runner.precisions[name].decode_stack = None
    steps: dict[int, dict] = {}
    for rows in ROWS:
        configurations = {
            "transformers float32 (DynamicCache)": transformers_steps(model, rows),
            "transformers bfloat16 (DynamicCache)": transformers_steps(bf16_model, rows),
        }
        for name, runner in runners.items():
            configurations[name] = fast_steps(runner, rows)
        for kind, source in ((MklPackedLinear, "fast float32"), (OneDnnPackedLinear, "fast bfloat16")):
            runner = started(model, source.split()[1])
            variant = packed(runner.precisions[source.split()[1]], kind, rows)
            if variant is not None:
                runner.pin(variant)
                configurations[f"fast, {kind.__doc__.split('(')[0].strip()}"] = fast_steps(runner, rows)
        # float32 activations whatever the weights (engine/fast/runner.py): one row covers every precision
        runner = started(model, "float32")
        skipped = without_matmuls(runner.precisions["float32"], rows)
        runner.pin(skipped)
        configurations["fast, matmuls skipped (the rest of the step)"] = fast_steps(runner, rows)
        for dtype in (torch.float32, torch.bfloat16):
            name = str(dtype).removeprefix("torch.")
            configurations[f"matmuls only {name}: 210 separate"] = layer_matmuls(model, dtype, rows, fused=False)
            configurations[f"matmuls only {name}: 120 fused"] = layer_matmuls(model, dtype, rows, fused=True)
            configurations[f"lm_head only {name}"] = lm_head_matmul(model, dtype, rows)
        steps[rows] = interleaved(configurations)
    results["steps"] = steps
    if with_agreement:
        results["agreement"] = agreement(model, tokenizer)
    results["load_after"] = os.getloadavg()[0]
    return results


# -- both ISAs, the report -------------------------------------------------------------------------------------------


def run_isa(env: dict[str, str], module: str, arguments: list[str]) -> dict:
    """`python -m module --one *arguments` with `env` added: the JSON it prints last (bench.roofline uses it too)."""
    output = subprocess.run(
        [sys.executable, "-m", module, "--one", *arguments],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    sys.stderr.write(output.stderr[-2000:])
    return json.loads(output.stdout.strip().splitlines()[-1])


EARLIER_MEASUREMENTS = [  # from earlier runs, not rerun here: the figures the product's comments give reasons by
    "",
    "## Earlier measurements",
    "",
    "Not rerun by `python -m bench.levers`; kept for the reasons the code gives. SmolLM2-135M, 2 cores, interleaved "
    "in one process unless said otherwise.",
    "",
    "- Huge pages (engine/fast/hugepages.py), 2-core AVX2 EPYC (a KVM guest), bfloat16-avx2 weights and KV cache "
    "from an Arena against torch's allocations, two runs: one-row step 44.4 -> 38.9 and 37.8 -> 35.1 ms; 16 rows "
    "147.3 -> 148.0 and 137.3 -> 134.3 ms (best of 15: 143 -> 134, 127 -> 106). SmolLM2's weights in bfloat16: 270 MB.",
    "- DenseLinear, 2-core AMX Xeon, SmolLM2's 120 fused matmuls: one row of bfloat16 through torch.mv 17.8 ms "
    "against F.linear's 23.7 (the output layer 1.5 against 2.3); 16 rows with the weight pre-packed by oneDNN: "
    "matmuls 30 -> 25 ms, the step 56 -> 52 ms; a one-row step on the plain layout 23.4 against 23.8 ms packed. "
    "Packed for 1 or 16 rows: alike.",
    "- Avx2Bf16Linear, 2-core AVX2 EPYC, 120 fused matmuls, two rounds: one row 19.7 and 17.2 ms (torch.mv over "
    "bfloat16 24.6, 28.8; float32 weights pre-packed by oneDNN 54.2, 54.0); 16 rows 45.9 and 38.2 ms (oneDNN "
    "float32 89.7, 92.1; torch's bfloat16 F.linear 234). Avx2Int4Linear in the same runs: one row 11.6 and 9.1 ms, "
    "16 rows 53.1 and 40.5 ms.",
    "- The C kernels' reason, 2-core AVX2 EPYC: torch.mv over bfloat16 read 10-13 GB/s of weights and float32 "
    "matrix-vector products 7-9 GB/s, where a plain read of the weights gave 15-18 GB/s; at 16 rows torch's "
    "emulated bfloat16 matmul was 2x slower than its float32 one.",
    "- int4 widened once into scratch (cpu_kernels.c's widens_once), 2-core EPYC, 120 matmuls: 32 rows 86.4 -> "
    "72.4 ms; 16 rows 41.6 -> 43.8 and 8 rows 23.4 -> 22.1 (noise); bfloat16 through scratch lost at every row "
    "count. One parallel region shared by the formats: 3x slower.",
    "- One row against two blocks (cpu_kernels.c's one_row_two_blocks), 2-core AMX Xeon, one-row decode steps, "
    "old and new build alternated 7 times (medians of 12 steps): bfloat16 24.5 -> 20.6 ms, int4 15.3 -> 13.9 ms, "
    "faster in every pair; the AVX512 build's 2 chains of 16 lanes measured the same.",
    "- AMX: on a 2-core AMX Xeon the float32 FMAs reached 155 GFLOPS and oneDNN's bfloat16 matmul through torch "
    "600-760; oneDNN's bfloat16 prefill of 7 prompts together differed from each alone by up to 0.6 in a logit. "
    "bfloat16-amx prefilled 7 prompts of 27 tokens in 201-236 ms against oneDNN's 162-245 (matmuls alone at half "
    "oneDNN's GFLOPS); oneDNN's bfloat16 prefilled them in 123 ms where the AVX2 kernels took 457 ms.",
    "- Start-up timing (engine/fast/autotune.py): on an AVX2 CPU torch's emulated bfloat16 took 2.5 s a prefill of "
    "192 tokens (start-up 8.8 s with it timed there); a prefill lasts 10-100x a decode step.",
    "- Int8Linear: aten's int8 weight-pack kernel about 10x faster with bfloat16 activations than float32 ones, at 1 "
    "and 16 rows, with and without AVX512.",
]


def report(native: dict, emulated: dict) -> str:
    def label(result: dict) -> str:
        return f"{result['capability']} (load {result['load_before']:.1f} -> {result['load_after']:.1f})"

    def chosen(result: dict) -> str:
        return f"decode steps {result['auto']}; prefills {result['auto_prefill']}"

    lines = [
        "# Levers of the fast decode path (`python -m bench.levers`)",
        "",
        f"SmolLM2-135M, {CONTEXT} cached positions per row, torch {torch.__version__}, {os.cpu_count()} cores. "
        "ms per decode step, "
        f"median of {ROUNDS * STEPS_PER_ROUND} (best in brackets), configurations interleaved in one process per ISA. "
        f"Native: {label(native)}; emulated AVX2: {label(emulated)} "
        f"({' '.join(f'`{name}={value}`' for name, value in AVX2_ENV.items())}). "
        "Load averages are of the whole 2-core host, shared while this ran.",
        "",
        f"`dtype: auto` chose: native {chosen(native)}; AVX2 {chosen(emulated)}.",
        "",
        "| configuration | native 1 row | native 16 rows | AVX2 1 row | AVX2 16 rows |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in native["steps"]["1"]:
        cells = []
        for result in (native, emulated):
            for rows in ("1", "16"):
                figure = result["steps"][rows].get(name)
                cells.append(f"{figure['median']:.1f} ({figure['best']:.1f})" if figure else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Greedy agreement with the fast runner in float32 over {len(AGREEMENT_PROMPTS)} prompts x "
        f"{AGREEMENT_STEPS} tokens, measured natively: "
        "teacher-forced (the share of float32's tokens picked when fed float32's own tokens), the share of whole "
        "sequences identical, and the mean length of the identical start.",
        "",
        "| weights | teacher-forced | identical sequences | mean identical prefix |",
        "|---|---:|---:|---:|",
    ]
    for name, figure in native["agreement"].items():
        lines.append(
            f"| {name} | {figure['teacher_forced']:.1%} | {figure['identical_sequences']:.0%} | "
            f"{figure['mean_identical_prefix']:.1f} |"
        )
    lines += EARLIER_MEASUREMENTS
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", action="store_true", help="measure this process's ISA only and print JSON")
    parser.add_argument("--no-agreement", action="store_true", help="with --one: timings only")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(with_agreement=not args.no_agreement)))
        return
    # Agreement natively only: it is a property of the weights, and the emulated bfloat16 runs take minutes.
    native = run_isa({}, "bench.levers", [])
    emulated = run_isa(AVX2_ENV, "bench.levers", ["--no-agreement"])
    text = report(native, emulated)
    OUTPUT.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
