"""What the scheduler decides for one engine step, as plain data, and the contract of the runner that executes it.

The scheduler (engine/scheduler.py, no torch) returns a StepPlan; a runner (engine/runner.py for any transformers
model, engine/fast/ for Llama-family models) executes it and owns every tensor: KV cache, masks, positions.
Requests are named by their id only, so the scheduler can be tested without a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the scheduler builds plans without torch
    import torch


@dataclass(frozen=True)
class PrefillChunk:
    request_id: str
    token_ids: list[int]  # prompt tokens prefilled this step
    start: int  # position of token_ids[0] in the prompt: the tokens before it are already in the cache


@dataclass
class PrefillPlan:
    """Prompt chunks prefilled together in one forward. The rows of a group are set up together (first=True; rows
    whose first chunk starts after 0 begin with the shared prefix of that length copied in) and join the running
    batch together once their prompts are complete (joins=True). A group spans several steps only when it holds a
    single prompt longer than the step's token budget."""

    chunks: list[PrefillChunk]
    first: bool
    joins: bool

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

    def start(self, shared_prefix: Sequence[int]) -> None:
        """Before the first step, on the loop thread: compute the cache of the token ids many prompts start with
        (empty: none)."""

    def prefill(self, plan: PrefillPlan) -> torch.Tensor:
        """Append each chunk to its row's cache. Returns the logits after each chunk's last token, [rows, vocab],
        in the plan's order."""

    def decode(self, request_ids: Sequence[str], input_ids: Sequence[int]) -> torch.Tensor:
        """Feed each running row its last sampled token. Returns the next logits, [rows, vocab], in the given order."""

    def free(self, request_ids: Sequence[str]) -> None:
        """Forget these rows (running or prefilling); unknown ids are ignored."""

    def reset(self) -> None:
        """Forget every row (after a failed step, whose state may be inconsistent); the shared prefix stays."""

    def describe(self) -> str:
        """What runs the steps, in which precision: for the start-up log (after start())."""
