"""Shared fixtures: a tiny random-weight model for fast tests, the embedded model for end-to-end ones, and
real flows served as `make serve` serves them (gRPC and HTTP through the service's gateway)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from engine.loading import embedded_model_dir
from harness.service import TINY_LIMITS, Service, serve


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    return embedded_model_dir()


TEMPLATES = Path(__file__).resolve().parent / "templates"
# The Hermes syntax's tags, of calls and of tools' results: tokens of their own in Qwen2.5's and Qwen3's vocabularies.
HERMES_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer Llama with random weights and the real SmolLM2 tokenizer: real code paths, fast steps."""
    return tiny_model(tmp_path_factory.mktemp("tiny-llama"), AutoTokenizer.from_pretrained(embedded_dir))


@pytest.fixture(scope="session")
def hermes_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """The tiny model with a chat template of its own tool syntax, Qwen2.5's (tests/templates/hermes.jinja), and
    its tags as tokens of their own, as in Qwen's vocabulary."""
    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    tokenizer.add_tokens(HERMES_TOKENS)
    tokenizer.chat_template = (TEMPLATES / "hermes.jinja").read_text()
    return tiny_model(tmp_path_factory.mktemp("tiny-hermes"), tokenizer)


def tiny_model(path: Path, tokenizer) -> Path:
    """A 2-layer Llama with random weights for `tokenizer`, saved with it in `path`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,  # room for streams long enough to observe while they run
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_service(tmp_path_factory, tiny_model_dir) -> Iterator[Service]:
    """The real flow on the tiny random model: fast, for everything but the model's answers."""
    with serve(tmp_path_factory, "tiny-flow", {"model": str(tiny_model_dir), **TINY_LIMITS}) as service:
        yield service


@pytest.fixture(scope="session")
def hermes_service(tmp_path_factory, hermes_model_dir) -> Iterator[Service]:
    """The real flow on the tiny model whose chat template has the Hermes tool syntax."""
    with serve(tmp_path_factory, "hermes-flow", {"model": str(hermes_model_dir), **TINY_LIMITS}) as service:
        yield service


@pytest.fixture(scope="session")
def embedded_service(tmp_path_factory) -> Iterator[Service]:
    """The real flow on the embedded SmolLM2 model, as `make serve` runs it (float32: reproducible)."""
    with serve(tmp_path_factory, "embedded-flow", {"model": "embedded", "dtype": "float32"}) as service:
        yield service
