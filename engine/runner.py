"""The model side of a step: prefill one prompt chunk, or decode one token for every running sequence.

Running sequences share one KV cache, left-padded to a common length (TGI's CausalLMBatch does the same): a
sequence joins by padding the shorter side, leaves by dropping its row, and padding columns that no row needs
any more are trimmed away. The attention mask hides the padding; each row carries its own positions.
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
    attention_mask: torch.Tensor  # [rows, cached length]: 1 for a real token, 0 for left padding
    positions: torch.Tensor  # [rows]: position of each row's next input token
    next_input_ids: torch.Tensor  # [rows]: the token each row feeds to the next decode step

    def __len__(self) -> int:
        return len(self.request_ids)


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

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def prefill(self, cache: DynamicCache, token_ids: list[int], start: int) -> torch.Tensor:
        """Run one chunk of a prompt (positions start..start+len) into a single-sequence cache.
        Returns the logits after its last token."""
        input_ids = torch.tensor([token_ids], device=self.device)
        positions = torch.arange(start, start + len(token_ids), device=self.device)[None]
        mask = torch.ones(1, start + len(token_ids), dtype=torch.long, device=self.device)
        return self._forward(input_ids, mask, positions, cache)[0]

    def decode(self, batch: DecodeBatch) -> torch.Tensor:
        """One token for every row. Returns logits [rows, vocab]."""
        ones = torch.ones(len(batch), 1, dtype=batch.attention_mask.dtype, device=self.device)
        batch.attention_mask = torch.cat([batch.attention_mask, ones], dim=1)
        logits = self._forward(batch.next_input_ids[:, None], batch.attention_mask, batch.positions[:, None], batch.cache)
        batch.positions += 1
        return logits

    def join(self, batch: DecodeBatch | None, request_id: str, cache: DynamicCache, first_token: int) -> DecodeBatch:
        """Add a freshly prefilled sequence to the running batch."""
        length = cache.get_seq_length()
        position = torch.tensor([length], device=self.device)
        token = torch.tensor([first_token], device=self.device)
        mask = torch.ones(1, length, dtype=torch.long, device=self.device)
        if batch is None:
            return DecodeBatch([request_id], cache, mask, position, token)
        batch_length = batch.attention_mask.shape[1]
        width = max(batch_length, length)
        for running, joining in zip(batch.cache.layers, cache.layers):
            running.keys = torch.cat([_left_pad(running.keys, width - batch_length, -2), _left_pad(joining.keys, width - length, -2)])
            running.values = torch.cat([_left_pad(running.values, width - batch_length, -2), _left_pad(joining.values, width - length, -2)])
        batch.attention_mask = torch.cat([_left_pad(batch.attention_mask, width - batch_length, -1), _left_pad(mask, width - length, -1)])
        batch.positions = torch.cat([batch.positions, position])
        batch.next_input_ids = torch.cat([batch.next_input_ids, token])
        batch.request_ids.append(request_id)
        return batch

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
