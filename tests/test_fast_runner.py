"""engine/fast/: the Llama forward matches transformers, and the Runner protocol (prefill groups, chunks, joins,
frees, the shared prefix) gives every row the tokens it gets alone."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import engine.fast.cache
import engine.fast.runner
from engine.fast import FastRunner, cpu_kernels, supports
from engine.fast.hugepages import HUGE_PAGE, Arena
from engine.fast.linear import (
    AMX_BFLOAT16,
    AVX2_BFLOAT16,
    AVX2_INT4,
    AVX512_BFLOAT16,
    C_PRECISIONS,
    AmxBf16Linear,
    Avx2Bf16Linear,
    Avx2Int4Linear,
    Avx512Bf16Linear,
    DenseLinear,
)
from engine.plan import PrefillChunk, PrefillPlan

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three colours:",
    "What is 12 times 7?",
    "The quick brown fox",
]


@pytest.fixture(scope="module")
def embedded(embedded_dir):
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    model = AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def prompt_ids(embedded) -> list[list[int]]:
    _, tokenizer = embedded
    return [tokenizer(prompt).input_ids for prompt in PROMPTS]


def started(model, max_rows: int = 8, max_len: int = 512, **settings) -> FastRunner:
    runner = FastRunner(model, max_rows, max_len, **{"dtype": "float32", **settings})
    runner.start()
    return runner


def prefill(
    runner: FastRunner,
    chunks: dict[str, tuple[list[int], int]],
    starts_rows: bool = True,
    completes_prompts: bool = True,
) -> dict[str, int]:
    """Prefill {id: (tokens, start)} as one group; the greedy token of each row."""
    plan = PrefillPlan(
        [PrefillChunk(rid, tokens, start) for rid, (tokens, start) in chunks.items()], starts_rows, completes_prompts
    )
    logits = runner.prefill(plan)
    return dict(zip(plan.request_ids, logits.argmax(-1).tolist()))


def decode(runner: FastRunner, last: dict[str, int]) -> dict[str, int]:
    ids = list(last)
    logits = runner.decode(ids, [last[rid] for rid in ids])
    return dict(zip(ids, logits.argmax(-1).tolist()))


def alone(runner: FastRunner, prompt: list[int], steps: int) -> list[int]:
    tokens = [prefill(runner, {"alone": (prompt, 0)})["alone"]]
    for _ in range(steps - 1):
        tokens.append(decode(runner, {"alone": tokens[-1]})["alone"])
    runner.free(["alone"])
    return tokens


@torch.no_grad()
def test_greedy_tokens_equal_model_generate(embedded, prompt_ids):
    model, tokenizer = embedded
    runner = started(model)
    for prompt in prompt_ids[:4]:
        expected = model.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )[0, len(prompt) :].tolist()
        assert alone(runner, prompt, 24) == expected


NO_AVX512_BF16 = "no AVX512-BF16 here: the CPU or the compiler lacks it, or ATEN_CPU_CAPABILITY caps the kernels"
NO_AMX = "no AMX here: the CPU lacks amx_bf16, the compiler AMX, or Linux does not grant the tiles"


def skip_without_avx2_kernels(precision: str) -> None:
    if precision in C_PRECISIONS and cpu_kernels.library() is None:
        pytest.skip(f"the AVX2 kernels cannot run here: {cpu_kernels.unsupported()}")
    if precision == AVX512_BFLOAT16 and not cpu_kernels.pairs_ready():
        pytest.skip(NO_AVX512_BF16)
    if precision == AMX_BFLOAT16 and not cpu_kernels.amx_ready():
        pytest.skip(NO_AMX)


@pytest.fixture(params=["float32", *C_PRECISIONS])
def precision(request) -> str:
    """The one precision a test's runner runs in: float32 on torch's kernels, bfloat16 or int4 weights on the
    AVX2 kernels, bfloat16 with AVX512-BF16, or bfloat16 on AMX tiles."""
    skip_without_avx2_kernels(request.param)
    return request.param


@torch.no_grad()
def test_rows_joining_chunked_and_freed_get_the_tokens_they_get_alone(embedded, prompt_ids, precision):
    """Rows of different lengths join at different times (one group padded, one prompt in two chunks, a group
    that joins while another is still being prefilled), run in a shuffled order, and leave mid-way."""
    model, _ = embedded
    runner = started(model, max_rows=5, candidates=[precision])
    assert runner.describe().startswith(f"fast path, decode weights {precision}, prefill weights {precision}")
    steps = 16
    expected = {f"r{index}": alone(runner, prompt, steps) for index, prompt in enumerate(prompt_ids[:5])}
    prompts = {f"r{index}": prompt for index, prompt in enumerate(prompt_ids[:5])}
    got: dict[str, list[int]] = {rid: [] for rid in prompts}
    running: list[str] = []

    def run(first_token: dict[str, int]) -> None:
        for rid, token in first_token.items():
            got[rid].append(token)
        running.extend(first_token)

    def step() -> None:
        order = running[::-1] if len(got[running[0]]) % 2 else running  # any order: logits come back in it
        for rid, token in decode(runner, {rid: got[rid][-1] for rid in order}).items():
            got[rid].append(token)

    def leave(rid: str) -> None:
        runner.free([rid])
        running.remove(rid)

    run(prefill(runner, {"r0": (prompts["r0"], 0)}))
    step()
    step()
    run(prefill(runner, {"r1": (prompts["r1"], 0), "r2": (prompts["r2"], 0)}))  # padded to the longer prompt
    step()
    long = prompts["r3"]
    half = len(long) // 2
    prefill(runner, {"r3": (long[:half], 0)}, completes_prompts=False)  # r3's first chunk: r3 does not decode yet
    step()
    run(prefill(runner, {"r4": (prompts["r4"], 0)}))  # joins while r3 waits in the slot r4 must take
    step()
    leave_after = {"r1": len(got["r1"])}
    leave("r1")  # a row in the middle of the running ones: the last one moves into its slot
    run(prefill(runner, {"r3": (long[half:], half)}, starts_rows=False))
    while running:
        step()
        for rid in list(running):
            if len(got[rid]) >= steps:
                leave(rid)
    assert got["r1"] == expected["r1"][: leave_after["r1"]]
    for rid in ("r0", "r2", "r3", "r4"):
        assert got[rid] == expected[rid], rid
    assert runner.cache.running == 0 and runner.cache.rows == 0


@torch.no_grad()
def test_rows_of_one_length_decode_without_a_mask_and_get_the_tokens_they_get_alone(embedded, prompt_ids):
    """Rows at the same position attend every cached position: the decode step passes no mask then."""
    model, _ = embedded
    runner = started(model)
    expected = alone(runner, prompt_ids[0], 8)
    last = prefill(runner, {"a": (prompt_ids[0], 0), "b": (prompt_ids[0], 0)})
    got = [last]
    for _ in range(7):
        last = decode(runner, last)
        got.append(last)
    assert [step["a"] for step in got] == [step["b"] for step in got] == expected


@pytest.fixture(params=C_PRECISIONS)
def row_exact_precision(request) -> str:
    """The precisions whose kernels compute every token alone: the ones dtype auto prefills in where they run
    with the prefix cache on, and the ones its exactness is guaranteed for."""
    skip_without_avx2_kernels(request.param)
    return request.param


def chat_turns(tokenizer, turns: int) -> list[list[int]]:
    """A conversation's prompts turn by turn, each resending the history (a fixed answer per turn)."""
    messages = [{"role": "system", "content": "You are a helpful assistant who answers briefly."}]
    prompts = []
    for turn, question in enumerate(PROMPTS[:turns]):
        messages.append({"role": "user", "content": question})
        prompts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        messages.append({"role": "assistant", "content": f"Answer number {turn}: it depends on the weather."})
    return [tokenizer(prompt).input_ids for prompt in prompts]


def prefill_caching(runner: FastRunner, request_id: str, prompt: list[int], chunk: int = 512) -> torch.Tensor:
    """Prefill a prompt as the scheduler plans it with the runner's prefix cache: its cached blocks copied in,
    the rest in chunks, every chunk's new blocks stored. Returns the logits after its last token."""
    cache = runner.prefix_cache
    assert cache is not None
    blocks = cache.lookup(prompt)
    start = len(blocks) * cache.block_size
    cached = tuple(block.id for block in blocks)
    while True:
        end = min(start + chunk, len(prompt))
        reservation = cache.reserve(prompt, end)
        plan = PrefillChunk(request_id, prompt[start:end], start, cached, tuple(reservation.writes))
        logits = runner.prefill(
            PrefillPlan([plan], starts_rows=bool(cached) or start == 0, completes_prompts=end == len(prompt))
        )
        cache.commit(reservation)
        cache.release(blocks)
        blocks, cached, start = [], (), end
        if end == len(prompt):
            return logits


@torch.no_grad()
def test_a_prompt_whose_prefix_is_cached_gets_bitwise_what_it_gets_computed_whole(embedded, row_exact_precision):
    """The prefix cache's exactness: each turn of a conversation, its earlier turns' blocks copied from the cache,
    gives bitwise the logits, KV cache and decode steps of the same prompt prefilled without a cache, whole or
    in chunks that start anywhere (the blocks were written by a prefill that began elsewhere)."""
    model, tokenizer = embedded
    turns = chat_turns(tokenizer, 3)
    warm = started(model, candidates=[row_exact_precision], prefix_cache_mib=64, prefix_block_size=16)
    cold = started(model, candidates=[row_exact_precision])
    assert warm.prefix_cache is not None and cold.prefix_cache is None

    def row(runner: FastRunner, request_id: str, prompt: list[int], logits: torch.Tensor) -> list[torch.Tensor]:
        """The row's KV cache, then the logits of 4 greedy decode steps; frees the row."""
        slot = runner.cache.slot(request_id)
        kv = [layer[slot, :, : len(prompt)].clone() for layer in runner.cache.kv]
        last = logits.argmax(-1).tolist()
        steps = []
        for _ in range(4):
            step = runner.decode([request_id], last)
            steps.append(step)
            last = step.argmax(-1).tolist()
        runner.free([request_id])
        return [logits, *kv, *steps]

    hits = 0
    for turn, prompt in enumerate(turns):
        hits_before = warm.prefix_cache.stats.hit_tokens
        cached_row = row(warm, f"t{turn}", prompt, prefill_caching(warm, f"t{turn}", prompt))
        hits += warm.prefix_cache.stats.hit_tokens > hits_before
        whole = cold.prefill(PrefillPlan([PrefillChunk("whole", prompt, 0)], starts_rows=True, completes_prompts=True))
        whole_row = row(cold, "whole", prompt, whole)
        chunk_plans = [PrefillChunk("chunked", prompt[i : i + 7], i) for i in range(0, len(prompt), 7)]
        for index, chunk in enumerate(chunk_plans):
            chunked = cold.prefill(
                PrefillPlan([chunk], starts_rows=index == 0, completes_prompts=index == len(chunk_plans) - 1)
            )
        chunked_row = row(cold, "chunked", prompt, chunked)
        for cached_part, whole_part, chunked_part in zip(cached_row, whole_row, chunked_row):
            assert torch.equal(cached_part, whole_part) and torch.equal(chunked_part, whole_part), f"turn {turn}"
    assert hits == len(turns) - 1  # every later turn found its history cached


def tiny_llama(**overrides) -> LlamaForCausalLM:
    settings = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides})).eval()


ROPE_VARIANTS = {
    "default": {},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "llama3": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    },
    "yarn": {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
    "untied, no GQA, head_dim 32": {"tie_word_embeddings": False, "num_key_value_heads": 4, "head_dim": 32},
}


@pytest.mark.parametrize("name", [AVX2_BFLOAT16, AVX2_INT4, AVX512_BFLOAT16])
@torch.no_grad()
def test_the_c_layer_stack_decodes_bitwise_as_the_python_layers_do(name):
    """engine/fast/stack.py runs a decode step's layers in one C call: rows of different lengths, past the cache's
    first capacity (it grows under the stack), give the logits the Python loop over the same kernels gives.
    SmolLM2's head shape: head_dim 64, 3 query heads per KV head."""
    skip_without_avx2_kernels(name)
    model = tiny_llama(hidden_size=192, num_attention_heads=3, num_key_value_heads=1, head_dim=64)
    runners = [started(model, max_rows=3, max_len=400, candidates=[name]) for _ in range(2)]
    stacked, looped = runners
    stack = stacked.precisions[name].decode_stack
    assert stack is not None
    stacked.precisions[name].decode_stack = counted = mock.Mock(wraps=stack)
    looped.precisions[name].decode_stack = None
    torch.manual_seed(1)
    prompts = {rid: torch.randint(0, 256, (length,)).tolist() for rid, length in (("a", 240), ("b", 9), ("c", 30))}
    plan = PrefillPlan([PrefillChunk(rid, prompt, 0) for rid, prompt in prompts.items()], True, True)
    tokens = {}
    for runner in runners:
        tokens[runner] = dict(zip(plan.request_ids, runner.prefill(plan).argmax(-1).tolist()))
    order = ["b", "c", "a"]
    for _ in range(40):  # row a passes position 256, where the cache grows
        logits = [runner.decode(order, [tokens[runner][rid] for rid in order]) for runner in runners]
        assert torch.equal(logits[0], logits[1])
        for runner, step_logits in zip(runners, logits):
            tokens[runner] = dict(zip(order, step_logits.argmax(-1).tolist()))
    assert counted.call_count == 40  # every decode step went through the stack
    assert stacked.cache.capacity > 256


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
@torch.no_grad()
def test_logits_match_transformers_forward_on_a_tiny_random_llama(variant):
    model = tiny_llama(**ROPE_VARIANTS[variant])
    assert supports(model)
    runner = started(model, max_rows=2, max_len=400)
    torch.manual_seed(1)
    sequence = torch.randint(0, 256, (2, 300))
    reference = model(sequence).logits  # [rows, 300, vocab]
    logits = runner.prefill(
        PrefillPlan(
            [PrefillChunk("a", sequence[0, :290].tolist(), 0), PrefillChunk("b", sequence[1, :250].tolist(), 0)],
            True,
            True,
        )
    )
    torch.testing.assert_close(logits, torch.stack([reference[0, 289], reference[1, 249]]), atol=1e-4, rtol=1e-4)
    # decode steps past the shorter row's prompt: positions 290.. and 250.. (beyond yarn's original context)
    for step in range(5):
        logits = runner.decode(["b", "a"], [sequence[1, 250 + step].item(), sequence[0, 290 + step].item()])
        torch.testing.assert_close(
            logits, torch.stack([reference[1, 250 + step], reference[0, 290 + step]]), atol=1e-4, rtol=1e-4
        )


@pytest.mark.parametrize(
    "model",
    [
        pytest.param(lambda: tiny_llama(attention_bias=True), id="attention bias"),
        pytest.param(lambda: tiny_llama(mlp_bias=True), id="mlp bias"),
        pytest.param(lambda: tiny_llama(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), id="dynamic rope"),
        pytest.param(lambda: tiny_llama(hidden_act="gelu"), id="gelu"),
        pytest.param(lambda: GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)), id="gpt2"),
    ],
)
def test_models_the_forward_does_not_reproduce_are_not_supported(model):
    model = model()
    assert not supports(model)
    with pytest.raises(ValueError, match="transformers runner"):
        FastRunner(model, 2, 64)


def test_an_unknown_quantization_is_refused_with_the_allowed_ones_named():
    with pytest.raises(ValueError, match="none, int8, int4"):
        FastRunner(tiny_llama(), 2, 64, quantization="int3")
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        FastRunner(tiny_llama(), 2, 64, dtype="float8")
    with pytest.raises(ValueError, match=r"unknown precisions \['bfloat8'\]: use float32, bfloat16"):
        FastRunner(tiny_llama(), 2, 64, candidates=["bfloat8"])


def greedy_agreement(runner: FastRunner, prompts: list[list[int]], references: list[list[int]]) -> float:
    """Share of the reference's greedy tokens that `runner` also picks when fed the reference's own tokens
    (teacher-forced, so one early difference does not count as every later token)."""
    agreed = total = 0
    chunks = {f"q{i}": (prompt, 0) for i, prompt in enumerate(prompts)}
    picked = prefill(runner, chunks)
    for step in range(len(references[0])):
        for index, rid in enumerate(chunks):
            agreed += picked[rid] == references[index][step]
            total += 1
        if step + 1 < len(references[0]):
            picked = decode(runner, {rid: references[index][step] for index, rid in enumerate(chunks)})
    runner.free(list(chunks))
    return agreed / total


@pytest.mark.parametrize(
    "precision, threshold", [("int8", 0.9), ("int4", 0.6), (AVX2_INT4, 0.6), (AVX512_BFLOAT16, 0.9)]
)
@torch.no_grad()
def test_lower_precisions_agree_with_float32_on_most_greedy_tokens(embedded, prompt_ids, precision, threshold):
    """Quantized weights, or bfloat16 activations: the greedy token after each float32 prefix, over 32 steps."""
    skip_without_avx2_kernels(precision)
    model, _ = embedded
    steps = 32
    reference = started(model)
    references = [alone(reference, prompt, steps) for prompt in prompt_ids]
    lower = started(model, candidates=[precision])
    agreement = greedy_agreement(lower, prompt_ids, references)
    logging.getLogger(__name__).info("%s greedy agreement with float32: %.3f", precision, agreement)
    assert agreement >= threshold


@torch.no_grad()
def test_auto_dtype_measures_and_keeps_one_decode_and_one_prefill_precision(tiny_model_dir, caplog):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with caplog.at_level(logging.INFO, logger="engine.fast.runner"):
        runner = started(model, max_rows=6, dtype="auto")
    assert "ms per decode step" in caplog.text and "ms per prefill" in caplog.text
    assert runner.cache.running == 0 and runner.cache.rows == 0
    # Where the C kernels run, decode steps only in a precision that computes a row as it would alone.
    assert runner.decode_precision.batch_exact == (cpu_kernels.library() is not None)
    kept = {runner.decode_precision.name, runner.prefill_precision.name}
    assert kept <= {"float32", "bfloat16", AVX2_BFLOAT16, AVX512_BFLOAT16, AMX_BFLOAT16}
    assert set(runner.precisions) == kept
    first = prefill(runner, {"x": ([1, 2, 3, 4], 0)})
    assert decode(runner, first).keys() == {"x"}


def tensors_of(value: object, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor reachable from `value` through attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from tensors_of(item, seen)
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_of(item, seen)
    elif hasattr(value, "__dict__") and not isinstance(value, type | torch.nn.Module):
        yield from tensors_of(vars(value), seen)


@torch.no_grad()
@pytest.mark.parametrize("dtype", ["float32", "auto"])
def test_a_started_runner_holds_no_view_of_its_source_weights(tiny_model_dir, dtype):
    """The runner's weights are its own memory: a view of the loaded model's tensors (same device and dtype: the
    embedding, the norms, a float32 output layer) would keep the whole weights file mapped after the source is
    released, hundreds of MB for the embedded model."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = started(model, dtype=dtype)
    source = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    held = list(tensors_of([runner.parts, runner.precisions]))
    assert any(tensor is runner.parts.embedding for tensor in held)  # the walk reaches the parts
    assert not [tensor.shape for tensor in held if tensor.untyped_storage().data_ptr() in source]


@torch.no_grad()
def test_prefills_and_decode_steps_run_in_the_precisions_measured_fastest_for_each(tiny_model_dir, monkeypatch):
    """A prefill is compute bound where a small decode step is memory bound: on an AMX CPU bfloat16 prefills
    fastest while the AVX2 kernels decode fastest. The measurement is the seam: here float32 'measures' faster
    for decode steps and bfloat16 for prefills, and every step must run in its own winner."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = FastRunner(model, 4, 128, candidates=["float32", "bfloat16"])

    def measured(candidates, sizes, time_step, **_):
        fastest = "bfloat16" if time_step == runner._time_prefill else "float32"
        return {(name, size): 0.1 if name == fastest else 0.2 for name in candidates for size in sizes}

    monkeypatch.setattr("engine.fast.autotune.measure", measured)
    runner.start()
    ran: list[str] = []
    real_forward = engine.fast.runner.forward

    def forward(llama, weights, cache, step):
        ran.append(weights.name)
        return real_forward(llama, weights, cache, step)

    monkeypatch.setattr("engine.fast.runner.forward", forward)
    first = prefill(runner, {"a": ([1, 2, 3, 4, 5], 0), "b": ([6, 7], 0)})
    decode(runner, first)
    assert ran == ["bfloat16", "float32"]
    assert set(runner.precisions) == {"float32", "bfloat16"}
    assert "prefill weights bfloat16" in runner.describe()


@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@torch.no_grad()
def test_every_matmul_kernel_of_a_dense_weight_computes_x_times_w_transposed(rows, dtype):
    """One row takes torch.mv, more rows oneDNN's pre-packed bfloat16 weight where this CPU has it, else
    F.linear: all give the product of the weight as stored (rounded to dtype) with the activations."""
    torch.manual_seed(0)
    weight, x = torch.randn(96, 64), torch.randn(rows, 1, 64)
    linear = DenseLinear(weight, dtype)
    expected = F.linear(x.to(dtype).double(), weight.to(dtype).double()).float()
    out = linear(x)
    assert out.shape == (rows, 1, 96) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=0.1 if dtype == torch.bfloat16 else 1e-4, rtol=0.02)


def test_the_avx2_kernels_load_wherever_the_cpu_and_a_compiler_allow():
    """They are built on first use; a build failure on a machine that can run them must not pass unnoticed."""
    reason = cpu_kernels.unsupported()
    assert (cpu_kernels.library() is None) == (reason is not None), reason


def unpacked_int4(linear: Avx2Int4Linear) -> torch.Tensor:
    """The [n, k] weight an Avx2Int4Linear holds, from its packed codes, scales and minimums."""
    nibbles, scale_min = linear.nibbles, linear.scale_min.float()  # [b, k, 8], [b, k / 32, 2, 16]
    blocks, k, _ = nibbles.shape
    codes = torch.stack([nibbles & 15, nibbles >> 4], dim=1).transpose(2, 3).reshape(blocks * 16, k).float()
    scale, minimum = (scale_min[:, :, part].transpose(1, 2).reshape(blocks * 16, -1) for part in (0, 1))
    return codes * scale.repeat_interleave(32, dim=1) + minimum.repeat_interleave(32, dim=1)


@pytest.mark.parametrize("precision", ["float32", "bfloat16", "int8", "int4", *C_PRECISIONS])
@torch.no_grad()
def test_a_prompts_prefill_is_bitwise_the_same_alone_and_in_any_group(embedded, prompt_ids, precision):
    """A prompt's logits and KV cache must not depend on the prompts prefilled beside it (padded to the longest,
    sharing the matmuls): torch's matmuls block by the row count, so where they run the rows go one by one; the C
    kernels compute a row alike in any batch, and then so do its decode steps."""
    skip_without_avx2_kernels(precision)
    runner = started(embedded[0], max_rows=6, candidates=[precision])  # SmolLM2: the tiny model's shapes hide
    prompts = dict(zip("abcd", prompt_ids[1:]))  # what SDPA does with padded rows

    def run(group: list[str]) -> dict[str, tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
        """Prefill `group` together, then 3 decode steps of it: per row, its logits, cache and step logits."""
        plan = PrefillPlan(
            [PrefillChunk(rid, prompts[rid], 0) for rid in group], starts_rows=True, completes_prompts=True
        )
        logits = runner.prefill(plan)
        end = {rid: len(prompts[rid]) for rid in group}
        slot = runner.cache.slot
        caches = {rid: [kv[slot(rid), :, : end[rid]].clone() for kv in runner.cache.kv] for rid in group}
        steps: dict[str, list[torch.Tensor]] = {rid: [] for rid in group}
        last = dict(zip(group, logits.argmax(-1).tolist()))
        for _ in range(3):
            step = runner.decode(group, [last[rid] for rid in group])
            for row, rid in enumerate(group):
                steps[rid].append(step[row])
            last = dict(zip(group, step.argmax(-1).tolist()))
        runner.free(group)
        return {rid: (logits[row], caches[rid], steps[rid]) for row, rid in enumerate(group)}

    alone = {rid: run([rid])[rid] for rid in prompts}
    for group in (["a", "b", "c", "d"], ["d", "b"], ["c", "a"]):
        for rid, (logits, cache, steps) in run(group).items():
            assert torch.equal(logits, alone[rid][0]), (precision, group, rid)
            assert all(torch.equal(x, y) for x, y in zip(cache, alone[rid][1])), (precision, group, rid)
            if runner.precisions[precision].batch_exact:
                assert all(torch.equal(x, y) for x, y in zip(steps, alone[rid][2])), (precision, group, rid)
    # the C kernels' precisions are exact as such; torch's are not, which is why their prefills go row by row
    assert runner.precisions[precision].batch_exact == (precision in C_PRECISIONS)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 33, 40])
@pytest.mark.parametrize("shape", [(48, 64), (96, 128)])  # 3 blocks (an odd pair) and 6; k of 2 and 4 tile steps
@torch.no_grad()
def test_the_amx_kernel_computes_bf16_x_times_w_transposed_and_each_row_as_it_would_alone(rows, shape):
    """Activations rounded to bfloat16 as torch rounds them, bfloat16 weights, float32 sums; partial row tiles
    (zero-padded), an odd last block, and any row count give every row the bits it gets alone."""
    if not cpu_kernels.amx_ready():
        pytest.skip(NO_AMX)
    torch.manual_seed(rows)
    weight, x = torch.randn(shape), torch.randn(rows, shape[1])
    linear = AmxBf16Linear(weight, Arena())
    out = linear(x)
    expected = x.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().t()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(out, torch.cat([linear(x[row : row + 1]) for row in range(rows)]))


@pytest.mark.parametrize("rows", [1, 2, 11, 12, 13, 25, 49, 100])
@pytest.mark.parametrize(
    "shape", [(48, 64), (96, 128), (32, 48)], ids=["an odd count of blocks", "6 blocks", "k of 48"]
)
@torch.no_grad()
def test_the_avx512_bf16_kernel_computes_bf16_x_times_w_transposed_and_each_row_as_it_would_alone(rows, shape):
    """Activations rounded to bfloat16 as torch rounds them, bfloat16 weights, the products summed in float32;
    tiles of 12 rows and their remainders, chunks of 48 rows, one row against blocks in pairs: every row gets the
    bits it gets alone, and a decode step's one row the bits of a prefill's."""
    if not cpu_kernels.pairs_ready():
        pytest.skip(NO_AVX512_BF16)
    torch.manual_seed(rows)
    weight, x = torch.randn(shape), torch.randn(rows, shape[1])
    linear = Avx512Bf16Linear(weight, Arena())
    out = linear(x)
    expected = x.to(torch.bfloat16).double() @ weight.to(torch.bfloat16).double().t()
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)
    assert torch.equal(out, torch.cat([linear(x[row : row + 1]) for row in range(rows)]))
    with pytest.raises(ValueError, match=r"\(32, 40\) weight"):  # k must be a multiple of 16
        Avx512Bf16Linear(torch.randn(32, 40), Arena())


@pytest.mark.parametrize("rows", [1, 2, 4, 5, 6, 7, 11, 12, 13, 16, 25, 49, 100])
@pytest.mark.parametrize(
    "shape", [(96, 64), (48, 64), (32, 20)], ids=["k multiple of 32", "an odd count of blocks", "k of 20"]
)
@pytest.mark.parametrize("kind", [Avx2Bf16Linear, Avx2Int4Linear])
@torch.no_grad()
def test_an_avx2_kernel_computes_x_times_w_transposed_and_each_row_as_it_would_alone(rows, shape, kind):
    """Tiles of 6 (bfloat16) or 4 (int4) rows, or 12 in the AVX512 build, and their remainders, chunks of 48
    rows, one row against blocks in pairs: the product of the weight as stored (bfloat16, or int4 codes times
    their group's scale plus its minimum) with float32 activations, and a row's output bit for bit the same in
    any batch (greedy batch == alone)."""
    if cpu_kernels.library() is None:
        pytest.skip(f"the AVX2 kernels cannot run here: {cpu_kernels.unsupported()}")
    if kind is Avx2Int4Linear and shape[1] % 32:
        with pytest.raises(ValueError, match=r"\(32, 20\) weight"):
            kind(torch.randn(*shape), Arena())
        return
    torch.manual_seed(0)
    weight, x = torch.randn(*shape), torch.randn(rows, 1, shape[1])
    linear = kind(weight, Arena())
    out = linear(x)
    assert out.shape == (rows, 1, shape[0]) and out.dtype == torch.float32
    if kind is Avx2Int4Linear:
        stored = unpacked_int4(linear)
        # each weight within half a step of its group's 16 levels (and the bfloat16 rounding of scale and minimum)
        step = (weight.view(shape[0], -1, 32).amax(-1) - weight.view(shape[0], -1, 32).amin(-1)) / 15
        assert ((stored - weight).abs() <= step.repeat_interleave(32, dim=1) * 0.5 + 0.05).all()
    else:
        stored = weight.to(torch.bfloat16)
    expected = F.linear(x.double(), stored.double()).float()
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for row in range(rows):
        assert torch.equal(linear(x[row : row + 1]), out[row : row + 1])


@torch.no_grad()
def test_the_avx512_build_of_the_kernels_computes_bitwise_what_the_avx2_build_does():
    """Where the CPU has AVX512F the kernels are built with it (16 features a register): a machine's choice of
    build must not change a single token."""
    if cpu_kernels.unsupported() is not None or "avx512f" not in cpu_kernels.cpu_flags():
        pytest.skip(f"no AVX512 build on this machine: {cpu_kernels.unsupported() or 'the CPU lacks avx512f'}")
    builds = cpu_kernels.build(cpu_kernels.FLAGS), cpu_kernels.build(cpu_kernels.AVX512_FLAGS)
    torch.manual_seed(0)
    arena = Arena()
    weight = torch.randn(48, 96)  # 3 blocks: one pair and an odd one for a single row
    bf16 = cpu_kernels.pack_bf16(weight, arena)
    nibbles, scale_min = cpu_kernels.pack_int4(weight, arena)
    for rows in (1, 3, 4, 6, 11, 12, 13, 24, 30):
        x = torch.randn(rows, 96)
        first, second = (cpu_kernels.linear_bf16(build, x, bf16) for build in builds)
        assert torch.equal(first, second), rows
        first, second = (cpu_kernels.linear_int4(build, x, nibbles, scale_min) for build in builds)
        assert torch.equal(first, second), rows


@pytest.mark.parametrize(
    ("capability", "flags_built"),
    [(None, "AMX"), ("avx512", "AMX"), ("avx2", "AVX2"), ("AVX2", "AVX2"), ("default", "AVX2")],
)
def test_torchs_isa_cap_caps_the_kernels_build_too(monkeypatch, capability, flags_built):
    """ATEN_CPU_CAPABILITY=avx2 makes an AVX512 machine run as an AVX2 one for torch; the kernels follow, or a
    benchmark of 'AVX2' would time their AVX512 build."""
    if cpu_kernels.unsupported() is not None:
        pytest.skip(f"the AVX2 kernels cannot run here: {cpu_kernels.unsupported()}")
    built: list[list[str]] = []
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2", "fma", "avx512f", "amx_bf16"})
    monkeypatch.setattr(cpu_kernels, "build", lambda flags: built.append(flags))
    if capability is None:
        monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    else:
        monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
    cpu_kernels.library.cache_clear()
    try:
        cpu_kernels.library()
    finally:
        cpu_kernels.library.cache_clear()
    assert built == [cpu_kernels.AMX_FLAGS if flags_built == "AMX" else cpu_kernels.FLAGS]


def test_the_avx2_kernels_refuse_a_weight_they_cannot_pack():
    if cpu_kernels.library() is None:
        pytest.skip(f"the AVX2 kernels cannot run here: {cpu_kernels.unsupported()}")
    with pytest.raises(ValueError, match=r"\(40, 64\) weight"):
        Avx2Bf16Linear(torch.randn(40, 64), Arena())


def anon_huge_kb() -> int:
    rollup = Path("/proc/self/smaps_rollup").read_text()
    return int(next(line.split()[1] for line in rollup.splitlines() if line.startswith("AnonHugePages:")))


def test_arena_tensors_are_separate_aligned_outlive_the_arena_and_sit_on_huge_pages_where_linux_offers_them():
    arena = Arena()
    before = anon_huge_kb() if Path("/proc/self/smaps_rollup").exists() else 0
    weights = [arena.copy(torch.full((1000, 33), float(index))) for index in range(3)]
    big = arena.zeros((3, HUGE_PAGE), torch.float32)  # 24 MB: several whole huge pages
    del arena
    for index, weight in enumerate(weights):
        assert weight.shape == (1000, 33) and weight.dtype == torch.float32
        assert weight.data_ptr() % 64 == 0 and torch.equal(weight, torch.full((1000, 33), float(index)))
    assert big.shape == (3, HUGE_PAGE) and not big.any()
    big.fill_(1.0)
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[never]" not in thp.read_text():
        assert anon_huge_kb() - before >= HUGE_PAGE // 1024  # at least one of the big tensor's pages is huge


@torch.no_grad()
def test_under_memory_pressure_the_prefix_cache_gives_its_memory_to_the_rows(tiny_model_dir, monkeypatch):
    """The rows' KV cache must grow (a prompt past its capacity) while the machine is short of memory: the prefix
    cache evicts its unused blocks and frees their storage before the rows' buffers are allocated, and fills
    again afterwards."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    runner = started(model, max_rows=2, max_len=1024, prefix_cache_mib=4, prefix_block_size=16)
    cache, pool = runner.prefix_cache, runner.cache.pool
    assert cache is not None and pool is not None
    prefill_caching(runner, "short", list(range(1, 100)))
    runner.free(["short"])
    assert cache.blocks == 6 and pool.layers()
    monkeypatch.setattr(engine.fast.cache, "available_memory", lambda: 0)
    dropped = []
    monkeypatch.setattr(pool, "drop", lambda: dropped.append(pool.blocks))
    prefill_caching(runner, "long", list(range(300, 700)))  # 400 positions: past the initial capacity of 256
    assert dropped  # its storage was given back
    assert runner.cache.capacity >= 400
    assert cache.cached_length(list(range(1, 100))) == 0 and cache.stats.evictions == 6
    runner.free(["long"])
    assert cache.blocks == 25  # the long prompt's own blocks, stored after the growth
