"""Structured outputs: a request's constraint (a JSON Schema, a regex or a Lark grammar) makes every token it samples
one its grammar allows, so the answer matches by construction.

- `Grammars` owns the grammar library (llguidance) for one tokenizer: it checks and compiles a constraint once,
  keeps the compiled grammars of recent constraints, and gives each request a matcher of its own.
- `GrammarMatcher` follows one request's tokens through its grammar.
- `MaskFiller` computes the allowed tokens of every constrained row of a step on a thread of its own, while the
  engine thread runs the forward; the sampler waits for them only when it needs them.

llguidance rather than xgrammar: xgrammar 0.2 imports pydantic 2 at import, and Jina 3.34 pins pydantic 1. Its
matchers compile lazily (a typical schema's grammar in about a millisecond) and copy cheaply, so a compiled
grammar is a pristine matcher that each request copies.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerBase

from engine.config import EngineConfig
from engine.prompts import InvalidRequest
from engine.request import Constraint, ConstraintKind

if TYPE_CHECKING:  # a typing name of the library's stubs only
    from llguidance._lib import JsonCompileOptions

# The longest reason quoted back from the library: its messages end with the grammar's text, already the client's.
_MAX_REASON_CHARS = 500
# JSON may put whitespace between its tokens, but not without bound: a small model can fall into writing newlines
# forever, where the grammar would let it. 32 characters hold a newline and the indentation of 7 levels of 4.
# A schema's own "x-guidance" options override it.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,32}"}


@dataclass(frozen=True)
class GrammarLimits:
    max_chars: int  # a constraint's text
    max_depth: int  # nesting of a JSON Schema's objects and arrays
    cache_size: int  # compiled grammars kept

    @classmethod
    def of(cls, config: EngineConfig) -> GrammarLimits:
        return cls(config.max_constraint_chars, config.max_schema_depth, config.grammar_cache_size)


class GrammarMatcher:
    """Where one request stands in its grammar. Only the engine thread touches it once the request runs."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self._matcher = matcher

    @property
    def native(self) -> llguidance.LLMatcher:
        """The library's matcher, for MaskFiller's batched call."""
        return self._matcher

    def accept(self, token_id: int) -> None:
        """Advance past a sampled token. The mask allowed only tokens the grammar takes, so a refusal is a bug."""
        if not self._matcher.consume_token(token_id):
            raise RuntimeError(f"the grammar refused token {token_id}: {self._matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """The answer matches and nothing more may follow it: the request ends here."""
        return self._matcher.is_stopped()


class Grammars:
    """The compiled grammars for one tokenizer and vocabulary (the width of the model's logits)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        eos_token_ids: Iterable[int],
        limits: GrammarLimits,
    ) -> None:
        self.vocab_size = vocab_size
        self.limits = limits
        self._hf_tokenizer = tokenizer
        self._eos_token_ids = sorted(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None  # built on first use: it takes a fraction of a second
        self._compiled: OrderedDict[Constraint, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()  # compiles run on the callers' threads

    def check(self, constraint: Constraint) -> None:
        """Compile the constraint unless it is cached (off the engine thread: the caller's). Raises
        InvalidRequest naming the problem or the limit."""
        self._pristine(constraint)

    def matcher(self, constraint: Constraint) -> GrammarMatcher:
        """A new request's matcher: a copy of the compiled grammar (compiled now unless cached)."""
        return GrammarMatcher(self._pristine(constraint).deep_copy())

    def _pristine(self, constraint: Constraint) -> llguidance.LLMatcher:
        with self._lock:
            compiled = self._compiled.get(constraint)
            if compiled is not None:
                self._compiled.move_to_end(constraint)
                return compiled
        compiled = self._compile(constraint)
        with self._lock:
            self._compiled[constraint] = compiled
            while len(self._compiled) > self.limits.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        kind, source = constraint.kind, constraint.source
        if len(source) > self.limits.max_chars:
            raise InvalidRequest(
                f"the {kind.value} is {len(source)} characters; the limit is {self.limits.max_chars} characters"
            )
        if kind is ConstraintKind.JSON_SCHEMA:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(self._checked_schema(source), _JSON_OPTIONS)
        elif kind is ConstraintKind.REGEX:
            grammar = llguidance.LLMatcher.grammar_from_regex(source)
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(source)
        try:
            matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        except (ValueError, RuntimeError) as error:  # a grammar the library cannot even read
            raise InvalidRequest(f"the {kind.value} does not compile: {_reason(str(error))}") from None
        if matcher.is_error():
            raise InvalidRequest(f"the {kind.value} does not compile: {_reason(matcher.get_error())}")
        return matcher

    def _checked_schema(self, source: str) -> Any:
        try:
            schema = json.loads(source)
        except json.JSONDecodeError as error:
            raise InvalidRequest(f"the json_schema is not JSON: {error}") from None
        if not isinstance(schema, dict | bool):
            raise InvalidRequest(f"the json_schema must be a JSON object, got {type(schema).__name__}")
        depth = _depth(schema)
        if depth > self.limits.max_depth:
            raise InvalidRequest(
                f"the json_schema nests {depth} levels deep; the limit is {self.limits.max_depth} levels"
            )
        return schema

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(
                    cast(Any, self._hf_tokenizer), n_vocab=self.vocab_size, eos_token=self._eos_token_ids
                )
            return self._tokenizer


def _depth(value: Any) -> int:
    """Nesting depth of a JSON value, without recursion (a client's value may nest deeper than Python's stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _reason(message: str) -> str:
    message = message.strip()
    return message if len(message) <= _MAX_REASON_CHARS else message[:_MAX_REASON_CHARS] + " ..."


class MaskFiller:
    """The allowed tokens of a step's constrained rows, computed on a thread of its own.

    `start` runs before the forward, from the matchers' state after the previous token; the library releases the
    GIL, so the masks fill while the forward's kernels run. Rows without a matcher allow every token.
    """

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-masks")
        self._llg_executor = llguidance.LLExecutor(1)
        self._shifts = torch.arange(32, dtype=torch.int32)

    def start(self, matchers: Sequence[GrammarMatcher | None]) -> Future[torch.Tensor | None]:
        """Future of a [rows, vocab] bool tensor of allowed tokens, or of None when no row is constrained."""
        if all(matcher is None for matcher in matchers):
            done: Future[torch.Tensor | None] = Future()
            done.set_result(None)
            return done
        return self._executor.submit(self._fill, list(matchers))

    def _fill(self, matchers: list[GrammarMatcher | None]) -> torch.Tensor:
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32)  # -1: every bit set, every token
        rows = [(matcher.native, row) for row, matcher in enumerate(matchers) if matcher is not None]
        self._llg_executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), words * 4, len(matchers))
        bits = (bitmask.unsqueeze(-1) >> self._shifts) & 1  # bit j of word w is token 32 w + j
        return bits.view(len(matchers), -1)[:, : self.vocab_size].bool()

    def close(self) -> None:
        self._executor.shutdown(wait=False)
