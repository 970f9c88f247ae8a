"""The runner for any transformers causal LM (the general fallback of engine/fast/): executes the scheduler's plans
(engine/plan.py) with the model's own forward and a DynamicCache.

Sequences share one KV cache, left-padded to a common length (TGI's CausalLMBatch does the same): a batch of
fresh sequences is prefilled together, then merges into the running batch by padding the shorter side; a
sequence leaves by dropping its row, and padding columns no row needs any more are trimmed away. The attention
mask hides the padding (at the left, or between a shared prefix and a prompt); each row carries its own positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel

from engine.plan import PrefillPlan


@dataclass
class DecodeBatch:
    request_ids: list[str]
    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, cached length]: 1 for a real token, 0 for padding
    positions: torch.Tensor  # [rows]: position of each row's next input token

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass(frozen=True)
class SharedPrefix:
    """The KV cache of token ids that many prompts begin with (a chat template's system turn): computed once,
    copied into each batch of prompts that starts with it, so that only the rest of each prompt is prefilled."""

    token_ids: tuple[int, ...]
    cache: DynamicCache


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

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device
        # Computing logits only for the last position saves a [length, vocab] matmul on every prefill.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._prefix: SharedPrefix | None = None
        self._running: DecodeBatch | None = None
        self._prefilling: DecodeBatch | None = None

    # ---- the Runner protocol ----

    def start(self, shared_prefix: Sequence[int]) -> None:
        if shared_prefix:
            batch = self._new_batch(["prefix"])
            self._prefill(batch, [list(shared_prefix)])
            self._prefix = SharedPrefix(tuple(shared_prefix), batch.cache)

    def prefill(self, plan: PrefillPlan) -> torch.Tensor:
        if plan.first:
            uses_prefix = plan.chunks[0].start > 0
            if uses_prefix and (self._prefix is None or plan.chunks[0].start != len(self._prefix.token_ids)):
                raise ValueError(f"no shared prefix of {plan.chunks[0].start} tokens to start the rows with")
            self._prefilling = self._new_batch(plan.request_ids, self._prefix if uses_prefix else None)
        batch = self._prefilling
        if batch is None or batch.request_ids != plan.request_ids:
            raise ValueError(f"the rows being prefilled are {batch and batch.request_ids}, not {plan.request_ids}")
        logits = self._prefill(batch, [chunk.token_ids for chunk in plan.chunks])
        if plan.joins:
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

    def free(self, request_ids: Sequence[str]) -> None:
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

    def _new_batch(self, request_ids: list[str], prefix: SharedPrefix | None = None) -> DecodeBatch:
        """A batch of sequences about to be prefilled: its cache holds the shared prefix in every row, or nothing."""
        rows = len(request_ids)
        cache = DynamicCache(config=self.model.config)
        if prefix is not None:
            for layer_index, layer in enumerate(_layers(prefix.cache)):
                cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), layer_index)
        cached = 0 if prefix is None else len(prefix.token_ids)
        mask = torch.ones(rows, cached, dtype=torch.long, device=self.device)
        positions = torch.full((rows,), cached, device=self.device)
        return DecodeBatch(list(request_ids), cache, mask, positions)

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
