"""The engine's settings and their defaults: the one place they are written (the executor, config.yml and the
bench take them from here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    max_running: int = 32  # sequences decoded together in one batch
    max_waiting: int = 256  # requests queued beyond that; more are refused as overloaded
    # Prompt tokens (padding included) prefilled per step: bounds how long one prefill stalls the running streams.
    # A forward costs a fixed part besides its tokens (python -m bench.trace times both), which smaller groups pay
    # more often; larger ones make the first prompts of a burst wait for more of the others. 192 splits a burst of
    # 16 chat prompts into two or three groups (how a group forms: docs/architecture.md).
    prefill_chunk: int = 192
    # While prompts wait for a free slot, prefill steps go before decode steps until the running sequences have
    # waited this long for their next token: a burst of arrivals gets its first tokens sooner, at the price of
    # one longer gap for the streams already running.
    max_decode_pause_s: float = 0.4
    max_model_len: int | None = None  # prompt + new tokens; default: the model's own context, capped at 4096
    # Refused before tokenizing: tokenizing a 10 MB prompt took 18 s. Default: 16 characters per context token.
    max_prompt_chars: int | None = None
    # Stop strings a request may give, and their length (OpenAI allows 4; TGI's default is 4 of any length).
    max_stop_strings: int = 16
    max_stop_length: int = 256
    # The compact Llama-family forward of engine/fast/ where the model is one it handles exactly; otherwise (or
    # when False) the transformers model itself (engine/runner.py).
    fast_path: bool = True
    # Weights of the fast path: none (the precision dtype gives or auto measures), int8 or int4 (weight-only,
    # CPU; int4 in groups of 32 as llama.cpp's Q4_1: on torch's kernel with an int8 output layer, or on the AVX2
    # kernels with a bfloat16 one, whichever measures faster at start-up). See engine/fast/linear.py.
    quantization: str = "none"
    # Automatic prefix caching (engine/prefix_cache.py, fast path only): the KV of prompts' prefixes is kept in
    # blocks of prefix_block_size tokens, in at most prefix_cache_mib MiB; a prompt that starts with cached blocks
    # prefills only the rest. 0 turns it off. Unused blocks go least recently used when room is needed. Copying
    # blocks costs the same per token whatever their size (bench/prefix_cost.md), so they are small: a prompt's
    # cached part ends within a few tokens of where it stops matching (the chat template's system turn whole).
    prefix_cache_mib: int = 1024
    prefix_block_size: int = 8
    # Structured outputs (engine/structured.py): a json_schema, regex or grammar longer than this is refused, as
    # is a schema nested deeper; compiling is then bounded (the slowest schema of that size measured in
    # docs/structured-outputs.md). The compiled grammars of this many recent constraints are kept.
    max_constraint_chars: int = 65536
    max_schema_depth: int = 32
    grammar_cache_size: int = 256
