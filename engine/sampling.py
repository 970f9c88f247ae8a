"""Choosing the next token of every row of a batch: greedy by default, temperature/top-p when asked."""

from __future__ import annotations

import torch

from engine.request import Request


def sample_next_tokens(logits: torch.Tensor, requests: list[Request]) -> list[int]:
    """logits: [batch, vocab] for the last position of each row."""
    next_tokens = torch.argmax(logits, dim=-1)
    for row, request in enumerate(requests):
        if not request.params.greedy:
            next_tokens[row] = _sample(logits[row], request)
    return next_tokens.tolist()


def _sample(logits: torch.Tensor, request: Request) -> int:
    params = request.params
    logits = logits.float()
    # Shifted so that the largest logit is 0: a tiny temperature then gives -inf (probability 0), not inf - inf.
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest set of tokens whose mass reaches top_p (the first token is always kept).
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs > params.top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if request.generator is None:
        request.generator = torch.Generator(device=probs.device)
        if params.seed is not None:
            request.generator.manual_seed(params.seed)
        else:
            request.generator.seed()
    return int(torch.multinomial(probs, 1, generator=request.generator))
