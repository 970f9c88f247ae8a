"""The runner for any transformers causal LM (the general fallback of engine/fast/): executes the scheduler's plans
(engine/plan.py) with the model's own forward and a DynamicCache.

Sequences share one KV cache, left-padded to a common length (TGI's CausalLMBatch does the same): a batch of
fresh sequences is prefilled together, then merges into the running batch by padding the shorter side; a
sequence leaves by dropping its row, and padding columns no row needs any more are trimmed away. The attention
mask hides the padding; each row carries its own positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from engine.plan import PrefillPlan
from engine.prefix_cache import PrefixCache


@dataclass
class DecodeBatch:
    request_ids: list[str]
    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, cached length]: 1 for a real token, 0 for padding
    positions: torch.Tensor  # [rows]: position of each row's next input token

    def __len__(self) -> int:
        return len(self.request_ids)


def _layers(cache: DynamicCache) -> list[Any]:
    """The cache's per-layer holders of keys and values (transformers' type for them also covers layers without)."""
    return list(cache.layers)


def _left_pad(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [amount, 0]
    return F.pad(tensor, pad)


class CacheRunner:
    """The Runner of engine/plan.py over a transformers model: the running batch, and the group being prefilled
    (a batch of its own until its prompts are complete, then merged into the running one)."""

    # Rows of one batch share their padding, not their prefixes: no prefix cache here.
    prefix_cache: PrefixCache | None = None
    prefix_block_bytes = 0
    decoded_kv_is_prefill_kv = False

    def __init__(self, model: PreTrainedModel, dtype: torch.dtype | None = None) -> None:
        """`dtype`: the precision to convert the model's weights to (the runner then owns them), None to keep it."""
        if dtype is not None:
            model.to(dtype)  # type: ignore[arg-type]  # transformers' to() wrapper is mistyped
        self.model = model
        self.device = model.device
        # Computing logits only for the last position saves a [length, vocab] matmul on every prefill.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._running: DecodeBatch | None = None
        self._prefilling: DecodeBatch | None = None

    # ---- the Runner protocol ----

    def start(self) -> None:
        pass

    def prefill(self, plan: PrefillPlan) -> torch.Tensor:
        if plan.starts_rows:
            if any(chunk.start for chunk in plan.chunks):
                raise ValueError("a first chunk starts after 0: this runner keeps no prefix cache")
            self._prefilling = self._new_batch(plan.request_ids)
        batch = self._prefilling
        if batch is None or batch.request_ids != plan.request_ids:
            raise ValueError(f"the rows being prefilled are {batch and batch.request_ids}, not {plan.request_ids}")
        logits = self._prefill(batch, [chunk.token_ids for chunk in plan.chunks])
        if plan.completes_prompts:
            self._running, self._prefilling = self._merge(self._running, batch), None
        return logits

    def decode(self, request_ids: Sequence[str], input_ids: Sequence[int]) -> torch.Tensor:
        batch = self._running
        if batch is None or sorted(batch.request_ids) != sorted(request_ids):
            raise ValueError(f"the running rows are {batch and batch.request_ids}, not {list(request_ids)}")
        row_of = {rid: row for row, rid in enumerate(batch.request_ids)}
        rows = torch.tensor([row_of[rid] for rid in request_ids], device=self.device)
        batch_input = torch.empty(len(batch), dtype=torch.long, device=self.device)
        batch_input[rows] = torch.tensor(list(input_ids), device=self.device)
        return self._decode(batch, batch_input)[rows]

    def free(self, request_ids: Sequence[str], keep: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
        ids = set(request_ids)
        if self._running is not None:
            self._running = self._remove(self._running, ids)
        if self._prefilling is not None:
            self._prefilling = self._remove(self._prefilling, ids)

    def reset(self) -> None:
        self._running = self._prefilling = None

    def describe(self) -> str:
        return f"transformers' {type(self.model).__name__} forward, {self.model.dtype} weights"

    # ---- batches ----

    def _forward(self, input_ids, attention_mask, position_ids, cache: DynamicCache) -> torch.Tensor:
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=cache,
            use_cache=True,
            **extra,
        )
        return out.logits[:, -1, :]

    def _new_batch(self, request_ids: list[str]) -> DecodeBatch:
        """A batch of sequences about to be prefilled, its cache empty."""
        rows = len(request_ids)
        mask = torch.ones(rows, 0, dtype=torch.long, device=self.device)
        positions = torch.zeros(rows, dtype=torch.long, device=self.device)
        return DecodeBatch(list(request_ids), DynamicCache(config=self.model.config), mask, positions)

    def _prefill(self, batch: DecodeBatch, chunks: list[list[int]]) -> torch.Tensor:
        """Append one prompt chunk per row in a single forward, each left-padded to the longest.
        Returns the logits after each row's last token, [rows, vocab]."""
        width = max(len(chunk) for chunk in chunks)
        padding = [width - len(chunk) for chunk in chunks]
        input_ids = torch.tensor([[0] * pad + chunk for pad, chunk in zip(padding, chunks)], device=self.device)
        chunk_mask = torch.tensor(
            [[0] * pad + [1] * len(chunk) for pad, chunk in zip(padding, chunks)], device=self.device
        )
        offsets = torch.tensor(
            [[0] * pad + list(range(len(chunk))) for pad, chunk in zip(padding, chunks)], device=self.device
        )
        batch.attention_mask = torch.cat([batch.attention_mask, chunk_mask], dim=1)
        logits = self._forward(input_ids, batch.attention_mask, batch.positions[:, None] + offsets, batch.cache)
        batch.positions += torch.tensor([len(chunk) for chunk in chunks], device=self.device)
        return logits

    def _decode(self, batch: DecodeBatch, input_ids: torch.Tensor) -> torch.Tensor:
        """One token for every row, in the batch's order. Returns logits [rows, vocab]."""
        ones = torch.ones(len(batch), 1, dtype=batch.attention_mask.dtype, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        logits = self._forward(input_ids[:, None], batch.attention_mask, batch.positions[:, None], batch.cache)
        batch.positions += 1
        return logits

    def _merge(self, running: DecodeBatch | None, joining: DecodeBatch) -> DecodeBatch:
        """Add freshly prefilled sequences to the running batch: one copy of the cache for all of them."""
        if running is None:
            return joining
        running_width, joining_width = running.attention_mask.shape[1], joining.attention_mask.shape[1]
        width = max(running_width, joining_width)

        def stack(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_left_pad(a, width - running_width, dim), _left_pad(b, width - joining_width, dim)])

        for layer, other in zip(_layers(running.cache), _layers(joining.cache)):
            layer.keys, layer.values = stack(layer.keys, other.keys, -2), stack(layer.values, other.values, -2)
        running.attention_mask = stack(running.attention_mask, joining.attention_mask, -1)
        running.positions = torch.cat([running.positions, joining.positions])
        running.request_ids += joining.request_ids
        return running

    def _remove(self, batch: DecodeBatch, request_ids: set[str]) -> DecodeBatch | None:
        """Drop finished or cancelled rows and the padding columns no remaining row needs."""
        keep = [row for row, rid in enumerate(batch.request_ids) if rid not in request_ids]
        if not keep:
            return None
        index = torch.tensor(keep, device=self.device)
        mask = batch.attention_mask[index]
        first_used = int(mask.any(dim=0).nonzero()[0])
        for layer in _layers(batch.cache):
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]
        batch.attention_mask = mask[:, first_used:]
        batch.positions = batch.positions[index]
        batch.request_ids = [batch.request_ids[row] for row in keep]
        return batch
