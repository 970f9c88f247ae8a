"""What the scheduler decides for one engine step, as plain data, and the contract of the runner that executes it.

The scheduler (engine/scheduler.py, no torch) returns a StepPlan; a runner (engine/runner.py for any transformers
model, engine/fast/ for Llama-family models) executes it and owns every tensor: KV cache, masks, positions.
Requests are named by their id only, so the scheduler can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the scheduler builds plans without torch
    import torch

    from engine.prefix_cache import PrefixCache


@dataclass(frozen=True)
class PrefillChunk:
    request_id: str
    token_ids: list[int]  # prompt tokens prefilled this step
    start: int  # position of token_ids[0] in the prompt: the tokens before it are already in the row
    # A row's first chunk: the prefix cache's blocks holding the prompt's positions [0, start), copied into the row.
    cached_blocks: tuple[int, ...] = ()
    # After the forward: the row's positions copied into these prefix cache blocks, as (block, first position).
    stores: tuple[tuple[int, int], ...] = ()


@dataclass
class PrefillPlan:
    """Prompt chunks prefilled together in one forward. A group spans several steps only when it holds a single
    prompt longer than the step's token budget."""

    chunks: list[PrefillChunk]
    # The group's first step: its rows are set up here, together (a row whose first chunk starts after 0 begins
    # with its cached blocks copied in).
    starts_rows: bool
    # The chunks end their prompts: after this step the rows join the running batch, together, and decode.
    completes_prompts: bool

    @property
    def request_ids(self) -> list[str]:
        return [chunk.request_id for chunk in self.chunks]


@dataclass
class StepPlan:
    freed: list[str] = field(default_factory=list)  # rows to drop first: cancelled or ended requests
    prefill: PrefillPlan | None = None
    decode: list[str] = field(default_factory=list)  # every running row, or none: one token each

    @property
    def empty(self) -> bool:
        return not self.freed and self.prefill is None and not self.decode


class Runner(Protocol):
    """Executes plans on a model. Called from the engine's loop thread only."""

    # The blocks of KV this runner keeps for prompts' prefixes (engine/prefix_cache.py), or None: it keeps none
    # and every chunk's cached_blocks and stores are empty.
    prefix_cache: PrefixCache | None
    prefix_block_bytes: int  # bytes one of its blocks holds; 0 without one

    def start(self) -> None:
        """Before the first step, on the loop thread (e.g. to time the precisions)."""

    def prefill(self, plan: PrefillPlan) -> torch.Tensor:
        """Append each chunk to its row's cache. Returns the logits after each chunk's last token, [rows, vocab],
        in the plan's order."""

    def decode(self, request_ids: Sequence[str], input_ids: Sequence[int]) -> torch.Tensor:
        """Feed each running row its last sampled token. Returns the next logits, [rows, vocab], in the given order."""

    @property
    def decoded_kv_is_prefill_kv(self) -> bool:
        """Whether a decoded token's KV is bitwise what a prefill of it computes (one precision for both, each
        token computed alone): then a finished row's answer can be kept in the prefix cache too. After start()."""

    def free(self, request_ids: Sequence[str], keep: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
        """Forget these rows (running or prefilling); unknown ids are ignored. `keep`: per row, prefix cache
        blocks to copy its positions into first, as (block, first position)."""

    def reset(self) -> None:
        """Forget every row (after a failed step, whose state may be inconsistent); the prefix cache's committed
        blocks stay (a step writes none but those it was given to fill)."""

    def describe(self) -> str:
        """What runs the steps, in which precision: for the start-up log (after start())."""
