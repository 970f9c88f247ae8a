"""FastRunner: engine/plan.py's Runner for Llama-family models, on engine/fast/model.py's forward and a slot
KV cache. Rows are named by request id; the scheduler never sees a tensor."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from transformers import LlamaForCausalLM, PreTrainedModel

from engine.config import EngineConfig
from engine.fast import autotune, cpu_kernels, heap
from engine.fast.cache import BlockPool, SlotCache
from engine.fast.linear import (
    AMX_BFLOAT16,
    AVX2_BFLOAT16,
    AVX2_INT4,
    AVX512_BFLOAT16,
    PRECISIONS,
    check_quantization,
)
from engine.fast.model import KernelOps, LlamaParts, PrecisionKernels, forward, supports
from engine.fast.step import StepInputs
from engine.plan import PrefillChunk, PrefillPlan
from engine.prefix_cache import PrefixCache, blocks_in_budget

log = logging.getLogger(__name__)

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
MEASURED_CONTEXT = 128  # cached positions per row while the precisions are timed: a short chat turn


class FastRunner:
    def __init__(
        self,
        model: PreTrainedModel,
        max_rows: int,
        max_len: int,
        dtype: str = "auto",
        quantization: str = "none",
        candidates: Sequence[str] | None = None,
        prefix_cache_mib: int = 0,
        prefix_block_size: int = EngineConfig.prefix_block_size,
    ) -> None:
        """`candidates`: the precisions start() measures and chooses from (linear.PRECISIONS' names), instead of
        those dtype, quantization and the machine give (candidate_precisions). One name pins every step to that
        precision, unmeasured: what the tests that compare a precision's bits and the benchmarks that time one
        precision use. An unknown name is a ValueError; a C precision this machine cannot run is one too.
        `prefix_cache_mib`: the prefix cache's budget (EngineConfig), 0 for none."""
        if not supports(model):
            raise ValueError(
                f"FastRunner does not handle {type(model).__name__} with this config: use the transformers runner"
            )
        if dtype != "auto" and dtype not in FLOAT_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: use auto, {', '.join(FLOAT_DTYPES)}")
        self.device = model.device
        check_quantization(quantization, self.device)
        unknown = [name for name in candidates or () if name not in PRECISIONS]
        if unknown:
            raise ValueError(f"unknown precisions {unknown}: use {', '.join(PRECISIONS)}")
        self.candidates = list(candidates) if candidates else candidate_precisions(dtype, quantization, self.device)
        # On CPU the residual stream, norms, RoPE, attention and the KV cache stay float32 whatever the
        # weights are: a row's cache then does not depend on which precision each step ran in (the band
        # changes with the batch size), and the casts around a matmul cost far less than the matmul.
        activation_dtype = torch.float32 if self.device.type == "cpu" else getattr(torch, self.candidates[0])
        self.parts = LlamaParts(cast(LlamaForCausalLM, model), max_len, self.device, activation_dtype)
        self.precisions = {name: self.parts.precision(name) for name in self.candidates}
        self.max_rows, self.max_len = max_rows, max_len
        shape = self.parts.shape
        block_bytes = BlockPool.block_bytes(shape, prefix_block_size, activation_dtype)
        blocks = blocks_in_budget(prefix_cache_mib, block_bytes)
        self.prefix_cache = PrefixCache(blocks, prefix_block_size) if blocks else None
        self.prefix_block_bytes = block_bytes if blocks else 0
        pool = BlockPool(shape, blocks, prefix_block_size, self.device, activation_dtype) if blocks else None
        self.cache = SlotCache(shape, max_rows, max_len, self.device, activation_dtype, pool)
        self.cache.on_memory_pressure = self._shrink_prefix_cache
        self.positions = torch.arange(max_len, device=self.device)
        self.decode_precision: PrecisionKernels | None = None  # chosen by start(), one for every batch size
        self.prefill_precision: PrecisionKernels | None = None  # chosen by start()
        self.measured = ""  # the timings behind the choice, for describe()
        self._prefill_shapes: dict[int, tuple[int, int]] = {}  # {tokens: (rows, tokens a row)} timed by start()

    # -- the Runner protocol ---------------------------------------------------------------------------------

    def start(self) -> None:
        self._choose_precisions()

    def prefill(self, plan: PrefillPlan) -> torch.Tensor:
        cache = self.cache
        if plan.starts_rows:
            for chunk in plan.chunks:
                cache.allocate(chunk.request_id, chunk.cached_blocks)
        slots = [cache.slot(chunk.request_id) for chunk in plan.chunks]
        for chunk, slot in zip(plan.chunks, slots):
            if not chunk.token_ids or chunk.start != cache.length(slot):
                raise ValueError(
                    f"chunk of {chunk.request_id!r} at {chunk.start} with {len(chunk.token_ids)} tokens: "
                    f"its row holds {cache.length(slot)} positions"
                )
        ends = [chunk.start + len(chunk.token_ids) for chunk in plan.chunks]
        cache.reserve(max(ends))
        step = self._prefill_inputs(plan.chunks, slots)
        logits = forward(self.parts, _started(self.prefill_precision), cache, step)
        for slot, chunk in zip(slots, plan.chunks):
            cache.advance(slot, len(chunk.token_ids))
            cache.store(chunk.request_id, chunk.stores)
        if plan.completes_prompts:
            cache.join(plan.request_ids)
        return logits

    def decode(self, request_ids: Sequence[str], input_ids: Sequence[int]) -> torch.Tensor:
        cache = self.cache
        rows = len(request_ids)
        slots = [cache.slot(request_id) if cache.has(request_id) else rows for request_id in request_ids]
        if rows != cache.running or sorted(slots) != list(range(rows)) or len(input_ids) != rows:
            raise ValueError(
                f"decode needs every running row once with one token each: {cache.running} run, {rows} given"
            )
        tokens = [0] * rows
        for slot, token in zip(slots, input_ids):
            tokens[slot] = token
        lengths = cache.running_lengths()
        attended = max(lengths) + 1
        cache.reserve(attended)
        positions = torch.tensor(lengths, device=self.device)
        step = StepInputs(
            input_ids=torch.tensor(tokens, device=self.device)[:, None],
            positions=positions[:, None],
            slots=slice(0, rows),
            write_at=(self.positions[:rows], positions),
            real_tokens=None,
            attended=attended,
            mask=None if min(lengths) + 1 == attended else self._mask(positions.view(rows, 1, 1, 1), attended),
            last=None,
            output_order=None if slots == list(range(rows)) else torch.tensor(slots, device=self.device),
        )
        logits = forward(self.parts, _started(self.decode_precision), cache, step)
        cache.advance_running()
        return logits

    def free(self, request_ids: Sequence[str], keep: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
        for request_id in request_ids:
            if keep and request_id in keep:
                self.cache.store(request_id, keep[request_id])
            self.cache.free(request_id)

    @property
    def decoded_kv_is_prefill_kv(self) -> bool:
        """One precision decodes and prefills, in kernels that compute each token alone (row-exact matmuls, each
        query's attention alone: KernelOps): a decoded token's KV is then what a prefill of it would write."""
        precision = self.decode_precision
        return (
            precision is not None
            and precision is self.prefill_precision
            and precision.batch_exact
            and isinstance(precision.ops, KernelOps)
        )

    def reset(self) -> None:
        self.cache.clear()
        self.cache.zero()

    def describe(self) -> str:
        if self.decode_precision is None or self.prefill_precision is None:
            return "fast path, its precisions not measured yet (start() has not run)"
        decode, prefill = self.decode_precision.name, self.prefill_precision.name
        return f"fast path, decode weights {decode}, prefill weights {prefill}{self.measured}"

    def pin(self, precision: PrecisionKernels) -> None:
        """Run every later step, decode and prefill, in `precision` instead of those start() chose: one of
        self.precisions, or a variant of one built from self.parts (bench/levers.py times its levers so). The
        runner's own timing of the candidates runs through here too."""
        self.decode_precision = self.prefill_precision = precision

    def _shrink_prefix_cache(self) -> None:
        """Memory is short: every unused block goes, and the blocks' storage with them unless a block this step
        copies into a row is left (blocks this step fills go into fresh storage)."""
        if self.prefix_cache is None or self.cache.pool is None:
            return
        evicted = self.prefix_cache.clear()
        if self.prefix_cache.blocks == 0:
            self.cache.pool.drop()
        log.warning("memory is short: the prefix cache evicted %d blocks to let the rows' KV cache grow", evicted)

    # -- steps -----------------------------------------------------------------------------------------------

    def _prefill_inputs(self, chunks: list[PrefillChunk], slots: list[int]) -> StepInputs:
        """Chunks right-padded to the longest; padding repeats a row's last real position (so its queries see
        only real keys) and is neither written to the cache nor read out."""
        rows, width = len(chunks), max(len(chunk.token_ids) for chunk in chunks)
        input_ids: list[list[int]] = []
        positions: list[list[int]] = []
        write_slots: list[int] = []
        write_positions: list[int] = []
        real_tokens: list[int] = []
        for row, (chunk, slot) in enumerate(zip(chunks, slots)):
            count = len(chunk.token_ids)
            input_ids.append(chunk.token_ids + [0] * (width - count))
            positions.append([chunk.start + min(index, count - 1) for index in range(width)])
            write_slots += [slot] * count
            write_positions += range(chunk.start, chunk.start + count)
            real_tokens += range(row * width, row * width + count)
        device, groups = self.device, self.parts.shape.groups
        position_tensor = torch.tensor(positions, device=device)
        attended = max(chunk.start + len(chunk.token_ids) for chunk in chunks)
        mask = self._mask(position_tensor[:, None, None, :, None], attended)  # [rows, 1, 1, tokens, attended]
        # repeated for the query heads sharing a KV head, the layout attention() uses
        mask = mask.expand(rows, 1, groups, width, attended).reshape(rows, 1, groups * width, attended)
        contiguous = slots == list(range(slots[0], slots[0] + rows))
        all_real = len(real_tokens) == rows * width
        return StepInputs(
            input_ids=torch.tensor(input_ids, device=device),
            positions=position_tensor,
            slots=slice(slots[0], slots[0] + rows) if contiguous else torch.tensor(slots, device=device),
            write_at=(torch.tensor(write_slots, device=device), torch.tensor(write_positions, device=device)),
            real_tokens=None if all_real else torch.tensor(real_tokens, device=device),
            attended=attended,
            mask=mask,
            last=None if all_real else torch.tensor([len(chunk.token_ids) - 1 for chunk in chunks], device=device),
            output_order=None,
            counts=[len(chunk.token_ids) for chunk in chunks],
        )

    def _mask(self, positions: torch.Tensor, attended: int) -> torch.Tensor:
        """0 where a key position is at most the query's position, -inf after it: [*positions.shape[:-1],
        attended] (positions end in a dimension of 1)."""
        visible = self.positions[:attended] <= positions
        return torch.zeros(visible.shape, device=self.device, dtype=self.cache.dtype).masked_fill_(
            visible.logical_not_(), -math.inf
        )

    # -- precision -------------------------------------------------------------------------------------------

    def _choose_precisions(self) -> None:
        """Time a decode step per candidate and batch size, and a prefill per candidate and token count (on
        this, the engine's loop thread: torch ops on another thread would start a second OpenMP team); keep the
        winners, drop the other weights."""
        # One precision for every decode step, among those that compute a row as it would alone where there are
        # such: a stream's tokens then do not depend on the streams beside it (its prefill is exact in every
        # precision: model.py). Bands by batch size would give a stream decoded alone other bits than in a batch
        # wherever two precisions win at different sizes, and so other greedy answers.
        exact = [name for name in self.candidates if self.precisions[name].batch_exact]
        decoders = exact or self.candidates
        # A prompt's cached prefix must hold what its prefill would have computed, wherever its chunks began:
        # row-exact matmuls compute a token the same in any chunk (torch's float32 did not for chunks of a
        # few tokens), and the C precisions' attention computes each query alone (model.KernelOps).
        prefillers = (exact or self.candidates) if self.prefix_cache is not None else self.candidates
        if len(self.candidates) == 1:
            self.pin(self.precisions[self.candidates[0]])
        else:
            row_counts = autotune.row_counts(self.max_rows)
            decode_timings = autotune.measure(decoders, row_counts, self._time_decode_step)
            self._prefill_shapes = autotune.prefill_shapes(self.max_rows, self.max_len)
            token_counts = list(self._prefill_shapes)
            prefill_timings = autotune.measure(
                prefillers,
                token_counts,
                self._time_prefill,
                timed=autotune.TIMED_PREFILLS,
                drop_beyond=autotune.PREFILL_DROP_BEYOND,
            )
            self.cache.clear()
            self.decode_precision = self.precisions[autotune.fastest_overall(decoders, row_counts, decode_timings)]
            self.prefill_precision = self.precisions[
                autotune.fastest_overall(prefillers, token_counts, prefill_timings)
            ]
            self.measured = (
                f"; ms per decode step (context {MEASURED_CONTEXT}): {_timings(decode_timings, 'x')}"
                f"; ms per prefill: {_timings(prefill_timings, 'tokens ')}"
            )
        log.info(self.describe())
        used = {_started(self.decode_precision).name, _started(self.prefill_precision).name}
        self.precisions = {name: precision for name, precision in self.precisions.items() if name in used}
        self.parts.release_source()
        heap.trim()  # the measurement's temporaries and the dropped precisions' weights

    def _time_decode_step(self, name: str, rows: int) -> None:
        """One decode step of `rows` rows with MEASURED_CONTEXT cached positions each, in precision `name`."""
        cache = self.cache
        cache.clear()
        context = min(MEASURED_CONTEXT, self.max_len - 1)
        cache.reserve(context + 1)
        request_ids = [f"\0measure-{row}" for row in range(rows)]
        for request_id in request_ids:
            cache.advance(cache.allocate(request_id), context)  # positions of stale, finite values
        cache.join(request_ids)
        self.pin(self.precisions[name])
        self.decode(request_ids, [0] * rows)

    def _time_prefill(self, name: str, tokens: int) -> None:
        """A prefill of `tokens` tokens (one of self._prefill_shapes) in precision `name`."""
        self.cache.clear()
        rows, width = self._prefill_shapes[tokens]
        chunks = [PrefillChunk(f"\0measure-{row}", [0] * width, 0) for row in range(rows)]
        self.pin(self.precisions[name])
        self.prefill(PrefillPlan(chunks, starts_rows=True, completes_prompts=False))


def _started(precision: PrecisionKernels | None) -> PrecisionKernels:
    if precision is None:
        raise RuntimeError("FastRunner.start() must run before the first step")
    return precision


def _timings(timings: dict[tuple[str, int], float], size_label: str) -> str:
    ordered = sorted(timings.items(), key=lambda item: item[0][1])
    return ", ".join(f"{name} {size_label}{size} {seconds * 1000:.1f}" for (name, size), seconds in ordered)


def candidate_precisions(dtype: str, quantization: str, device: torch.device) -> list[str]:
    """The precisions start() chooses from. A quantization asked for is used everywhere (its accuracy is what
    was asked). On CPU, dtype auto lets float32 and bfloat16 compete; bfloat16 and int4 weights
    run on torch's kernels or, where they run, on the AVX2 kernels (and bfloat16 with AVX512-BF16, and on AMX
    tiles), whichever measures faster. On CUDA bfloat16 is the fast path without measuring."""
    on_avx2 = device.type == "cpu" and cpu_kernels.library() is not None
    if quantization != "none":
        return [quantization, AVX2_INT4] if quantization == "int4" and on_avx2 else [quantization]
    if device.type != "cpu":
        return ["bfloat16" if dtype == "auto" else dtype]
    kernels = (
        [
            AVX2_BFLOAT16,
            *([AVX512_BFLOAT16] if cpu_kernels.pairs_ready() else []),
            *([AMX_BFLOAT16] if cpu_kernels.amx_ready() else []),
        ]
        if on_avx2
        else []
    )
    if dtype == "auto":
        return ["float32", "bfloat16", *kernels]
    return [dtype, *kernels] if dtype == "bfloat16" else [dtype]
