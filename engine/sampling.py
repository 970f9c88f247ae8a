"""Choosing the next token of every row of a batch: greedy by default; penalties, logit bias, temperature and
top-p when a request asks for them; only among the tokens its grammar allows when it is constrained; log
probabilities when it wants them."""

from __future__ import annotations

import torch

from engine.request import Request, TokenLogprobs


def sample_next_tokens(
    logits: torch.Tensor, requests: list[Request], allowed: torch.Tensor | None = None
) -> tuple[list[int], list[TokenLogprobs | None]]:
    """logits: [batch, vocab] for the last position of each row; allowed: [batch, vocab] bool, the tokens each
    row's grammar allows (engine/structured.py), None when no row is constrained. Rows that only want the greedy
    token cost one batched argmax; the others are processed row by row."""
    next_tokens = torch.argmax(logits, dim=-1)
    for row, request in enumerate(requests):
        params = request.params
        if params.processes_logits or not params.greedy or request.matcher is not None:
            processed = processed_logits(logits[row], request)
            if request.matcher is not None:
                assert allowed is not None
                processed.masked_fill_(~allowed[row], float("-inf"))
            next_tokens[row] = torch.argmax(processed) if params.greedy else _sample(processed, request)
    tokens = next_tokens.tolist()
    logprobs = [
        token_logprobs(logits[row], token, request.params.top_logprobs) if request.params.wants_logprobs else None
        for row, (request, token) in enumerate(zip(requests, tokens))
    ]
    return tokens, logprobs


def processed_logits(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """A row's logits after the request's logit bias and penalties (a float32 copy)."""
    params = request.params
    logits = logits.float().clone()
    if params.logit_bias:
        ids, biases = zip(*params.logit_bias)
        logits[list(ids)] += torch.tensor(biases, device=logits.device)
    if request.output_ids and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.tensor(request.output_ids, device=logits.device).unique(return_counts=True)
        logits[ids] -= params.presence_penalty + params.frequency_penalty * counts
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(request.prompt_ids + request.output_ids, device=logits.device).unique()
        scores = logits[seen]
        logits[seen] = torch.where(scores > 0, scores / params.repetition_penalty, scores * params.repetition_penalty)
    return logits


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> TokenLogprobs:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if top == 0:
        return TokenLogprobs(float(logprobs[token]))
    top_logprobs, top_ids = torch.topk(logprobs, top)
    return TokenLogprobs(float(logprobs[token]), tuple(top_ids.tolist()), tuple(top_logprobs.tolist()))


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
