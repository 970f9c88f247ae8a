"""The model side of a step: prefill prompt chunks of several sequences at once, or decode one token for every
running sequence.

Sequences share one KV cache, left-padded to a common length (TGI's CausalLMBatch does the same): a batch of
fresh sequences is prefilled together, then merges into the running batch by padding the shorter side; a
sequence leaves by dropping its row, and padding columns no row needs any more are trimmed away. The attention
mask hides the padding (at the left, or between a shared prefix and a prompt); each row carries its own positions.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel


@dataclass
class DecodeBatch:
    request_ids: list[str]
    cache: DynamicCache
    attention_mask: torch.Tensor  # [rows, cached length]: 1 for a real token, 0 for padding
    positions: torch.Tensor  # [rows]: position of each row's next input token
    next_input_ids: torch.Tensor  # [rows]: the token each row feeds to the next decode step

    def __len__(self) -> int:
        return len(self.request_ids)


@dataclass(frozen=True)
class SharedPrefix:
    """The KV cache of token ids that many prompts begin with (a chat template's system turn): computed once,
    copied into each batch of prompts that starts with it, so that only the rest of each prompt is prefilled."""

    token_ids: tuple[int, ...]
    cache: DynamicCache

    def starts(self, prompt_ids: list[int]) -> bool:
        return len(prompt_ids) > len(self.token_ids) and tuple(prompt_ids[: len(self.token_ids)]) == self.token_ids


def _left_pad(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    pad = [0, 0] * (tensor.dim() - 1 - dim % tensor.dim()) + [amount, 0]
    return F.pad(tensor, pad)


class ModelRunner:
    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model
        self.device = model.device
        # Computing logits only for the last position saves a [length, vocab] matmul on every prefill.
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

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

    def shared_prefix(self, token_ids: list[int]) -> SharedPrefix:
        batch = self.new_batch(["prefix"])
        self.prefill(batch, [token_ids])
        return SharedPrefix(tuple(token_ids), batch.cache)

    def new_batch(self, request_ids: list[str], prefix: SharedPrefix | None = None) -> DecodeBatch:
        """A batch of sequences about to be prefilled: its cache holds the shared prefix in every row, or nothing."""
        rows = len(request_ids)
        cache = DynamicCache(config=self.model.config)
        if prefix is not None:
            for layer_index, layer in enumerate(prefix.cache.layers):
                cache.update(layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), layer_index)
        cached = 0 if prefix is None else len(prefix.token_ids)
        mask = torch.ones(rows, cached, dtype=torch.long, device=self.device)
        positions = torch.full((rows,), cached, device=self.device)
        return DecodeBatch(list(request_ids), cache, mask, positions, torch.zeros_like(positions))

    def prefill(self, batch: DecodeBatch, chunks: list[list[int]]) -> torch.Tensor:
        """Append one prompt chunk per row in a single forward, each left-padded to the longest.
        Returns the logits after each row's last token, [rows, vocab]."""
        width = max(len(chunk) for chunk in chunks)
        padding = [width - len(chunk) for chunk in chunks]
        input_ids = torch.tensor([[0] * pad + chunk for pad, chunk in zip(padding, chunks)], device=self.device)
        chunk_mask = torch.tensor([[0] * pad + [1] * len(chunk) for pad, chunk in zip(padding, chunks)], device=self.device)
        offsets = torch.tensor([[0] * pad + list(range(len(chunk))) for pad, chunk in zip(padding, chunks)], device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, chunk_mask], dim=1)
        logits = self._forward(input_ids, batch.attention_mask, batch.positions[:, None] + offsets, batch.cache)
        batch.positions += torch.tensor([len(chunk) for chunk in chunks], device=self.device)
        return logits

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token for every row. Returns logits [rows, vocab]."""
        ones = torch.ones(len(batch), 1, dtype=batch.attention_mask.dtype, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        logits = self._forward(batch.next_input_ids[:, None], batch.attention_mask, batch.positions[:, None], batch.cache)
        batch.positions += 1
        return logits

    def merge(self, running: DecodeBatch | None, joining: DecodeBatch) -> DecodeBatch:
        """Add freshly prefilled sequences to the running batch: one copy of the cache for all of them."""
        if running is None:
            return joining
        running_width, joining_width = running.attention_mask.shape[1], joining.attention_mask.shape[1]
        width = max(running_width, joining_width)

        def stack(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
            return torch.cat([_left_pad(a, width - running_width, dim), _left_pad(b, width - joining_width, dim)])

        for layer, other in zip(running.cache.layers, joining.cache.layers):
            layer.keys, layer.values = stack(layer.keys, other.keys, -2), stack(layer.values, other.values, -2)
        running.attention_mask = stack(running.attention_mask, joining.attention_mask, -1)
        running.positions = torch.cat([running.positions, joining.positions])
        running.next_input_ids = torch.cat([running.next_input_ids, joining.next_input_ids])
        running.request_ids += joining.request_ids
        return running

    def remove(self, batch: DecodeBatch, request_ids: set[str]) -> DecodeBatch | None:
        """Drop finished or cancelled rows and the padding columns no remaining row needs."""
        keep = [row for row, rid in enumerate(batch.request_ids) if rid not in request_ids]
        if not keep:
            return None
        index = torch.tensor(keep, device=self.device)
        mask = batch.attention_mask[index]
        first_used = int(mask.any(dim=0).nonzero()[0])
        for layer in batch.cache.layers:
            layer.keys = layer.keys[index, :, first_used:]
            layer.values = layer.values[index, :, first_used:]
        batch.attention_mask = mask[:, first_used:]
        batch.positions = batch.positions[index]
        batch.next_input_ids = batch.next_input_ids[index]
        batch.request_ids = [batch.request_ids[row] for row in keep]
        return batch
