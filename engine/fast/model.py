"""A compact Llama forward over a slot KV cache, gpt-fast style: one function per step, fused projections.

Per layer: RMSNorm, one QKV matmul, RoPE on q and k together, K/V written into the cache at each token's
position, SDPA over the rows' cached positions, one output matmul; RMSNorm, one gate+up matmul, SiLU, one
down matmul. 30 layers make 120 matmuls instead of transformers' 210, and about 25 torch ops per layer. The
AVX2 precisions run a decode step's layers in one C call instead (engine/fast/stack.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property, partial

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM, PreTrainedModel

from engine.fast import cpu_kernels
from engine.fast.cache import SlotCache
from engine.fast.hugepages import Arena
from engine.fast.linear import AVX2_BFLOAT16, AVX2_INT4, C_PRECISIONS, Linear, make_linear
from engine.fast.stack import DecodeStack
from engine.fast.step import LayerNorms, LayerWeights, Shape, StepInputs

# RoPE variants whose frequencies do not depend on the sequence length: a table computed once matches
# transformers exactly. "dynamic" and "longrope" rescale with the length and are left to the fallback.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def supports(model: PreTrainedModel) -> bool:
    """True when `forward` below computes exactly what transformers computes for this model."""
    config = model.config
    if not isinstance(model, LlamaForCausalLM) or getattr(config, "model_type", None) != "llama":
        return False
    if getattr(model, "hf_quantizer", None) is not None or not model.dtype.is_floating_point:
        return False
    rotary = getattr(model.model, "rotary_emb", None)
    return (
        getattr(rotary, "rope_type", None) in STATIC_ROPE_TYPES
        and config.hidden_act == "silu"
        and not getattr(config, "attention_bias", False)
        and not getattr(config, "mlp_bias", False)
        and getattr(config, "pretraining_tp", 1) == 1
        and config.num_attention_heads % config.num_key_value_heads == 0
    )


Rotation = Callable[[torch.Tensor, int], None]  # (qkv [rows, tokens, heads, head_dim], heads to rotate): in place


class TorchOps:
    """A step's RMSNorms, RoPE, attention and SiLU, on torch."""

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    def rotation(self, parts: LlamaParts, step: StepInputs) -> Rotation:
        """RoPE at the step's positions, for every layer: the tables are gathered once a step."""
        cos = parts.cos[step.positions].unsqueeze(2)  # [rows, tokens, 1, head_dim]: broadcast over heads
        sin = parts.sin_signed[step.positions].unsqueeze(2)
        return lambda qkv, heads: rope_(qkv[:, :, :heads], cos, sin)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: StepInputs, shape: Shape
    ) -> torch.Tensor:
        return attention(q, keys, values, step.mask, shape)


class KernelOps(TorchOps):
    """RMSNorm, RoPE, SiLU and attention through the C kernels (cpu_kernels.c): one call each where torch runs
    several ops (8 for an RMSNorm; SDPA sets up a flash-attention tiling for a single query). The results differ
    from torch's in float32 rounding only; they go with the C precisions (C_PRECISIONS), not with float32 (whose
    steps the tests compare with transformers'). They are the kernels DecodeStack runs, so both give a decode
    step the same bits."""

    def __init__(self) -> None:
        kernels = cpu_kernels.library()
        if kernels is None:
            raise ValueError(f"the C kernels cannot run here: {cpu_kernels.unsupported()}")
        self.kernels = kernels

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return cpu_kernels.rms_norm(self.kernels, x, weight, eps)

    def rotation(self, parts: LlamaParts, step: StepInputs) -> Rotation:
        positions = step.positions.contiguous()
        return lambda qkv, heads: cpu_kernels.rope_(self.kernels, qkv, heads, positions, parts.cos, parts.sin_signed)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return cpu_kernels.silu_mul(self.kernels, gate_up)

    def attention(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: StepInputs, shape: Shape
    ) -> torch.Tensor:
        """Every query alone, over the positions up to its own, with the decode step's kernel: a token's result
        is then the same in a prefill chunk of any size, or decoded (SDPA's changed with the queries beside it,
        so a prompt's KV would depend on where its chunks began, and a cached prefix would not be exact)."""
        rows, tokens = q.shape[:2]
        if shape.head_dim % 8:  # the kernel reads heads 8 floats at a time
            return super().attention(q, keys, values, step, shape)
        visible = step.positions.to(torch.int64) + 1  # padding repeats its row's last position: computed, unread
        if tokens == 1:
            return cpu_kernels.attention_decode(self.kernels, q[:, 0], keys, values, visible[:, 0]).view(rows, 1, -1)
        out = [  # a row's tokens as the rows of one call, every one reading its row's cache (a stride-0 view)
            cpu_kernels.attention_decode(
                self.kernels,
                q[row],
                keys[row : row + 1].expand(tokens, -1, -1, -1),
                values[row : row + 1].expand(tokens, -1, -1, -1),
                visible[row].contiguous(),
            )
            for row in range(rows)
        ]
        return torch.stack(out).view(rows, tokens, -1)


@dataclass
class PrecisionKernels:
    """Everything a step runs in one precision: the matmul weights packed in its format (`layers`, `lm_head`),
    the op table that goes with them (`ops`: TorchOps, or KernelOps for the C precisions) and, where it can run,
    the decode stack over those weights. The runner keeps one for decode steps and one for prefills."""

    name: str
    layers: list[LayerWeights]
    lm_head: Linear
    ops: TorchOps = field(default_factory=TorchOps)
    decode_stack: DecodeStack | None = None  # every layer of a decode step in one call, where it can run

    @cached_property
    def batch_exact(self) -> bool:
        """Every matmul computes a row as it would alone (Linear.batch_exact). Where one does not, a prefill of
        several rows runs them row by row: oneDNN's bfloat16 prefill of prompts together differs from each alone
        enough to change a greedy token."""
        matmuls = [linear for layer in self.layers for linear in vars(layer).values()]  # LayerWeights' four
        return all(linear.batch_exact for linear in [*matmuls, self.lm_head])


class LlamaParts:
    """Not a model: the parts of a LlamaForCausalLM that every precision shares (norms, embeddings, RoPE tables,
    shape), and, until release_source(), the float weights `precision(name)` builds each PrecisionKernels from."""

    def __init__(
        self, model: LlamaForCausalLM, max_len: int, device: torch.device, activation_dtype: torch.dtype
    ) -> None:
        config = model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.shape = Shape(
            config.num_hidden_layers,
            config.num_attention_heads,
            config.num_key_value_heads or config.num_attention_heads,
            head_dim,
            config.hidden_size,
            config.rms_norm_eps,
        )
        self.device, self.activation_dtype = device, activation_dtype
        self._source: LlamaForCausalLM | None = (
            model  # the float weights every precision is built from; dropped by release_source()
        )

        def param(tensor: torch.Tensor) -> torch.Tensor:
            # A copy even where device and dtype are the source's: a view would keep the source's memory (the
            # whole mapping of the loaded weights file) after release_source().
            return tensor.detach().to(device=device, dtype=activation_dtype, copy=True).contiguous()

        self.embedding = param(model.model.embed_tokens.weight)
        self.norms = LayerNorms(
            inputs=[param(layer.input_layernorm.weight) for layer in model.model.layers],
            post_attention=[param(layer.post_attention_layernorm.weight) for layer in model.model.layers],
            final=param(model.model.norm.weight),
        )
        self.cos, self.sin_signed = rope_tables(model, max_len, device, activation_dtype)

    def precision(self, name: str) -> PrecisionKernels:
        """The matmul weights as float32, bfloat16, float16, int8 or int4 (weight-only, CPU), or bfloat16 or int4
        through the AVX2 kernels, or bfloat16 on AMX tiles (linear.make_linear's precisions), with their ops."""
        model = self._source
        if model is None:
            raise RuntimeError("the source weights were released")
        arena = Arena()  # one per precision: its chunks go when the precision goes

        def linear(weights: list[torch.Tensor]) -> Linear:
            return make_linear(name, torch.cat([w.detach() for w in weights]).to(self.device), arena)

        layers = []
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            layers.append(
                LayerWeights(
                    qkv=linear([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]),
                    out=linear([attention.o_proj.weight]),
                    gate_up=linear([mlp.gate_proj.weight, mlp.up_proj.weight]),
                    down=linear([mlp.down_proj.weight]),
                )
            )
        # The output layer decides every token: int4 there costs more agreement than it saves. int8 does not;
        # int4-avx2 keeps it bfloat16 on the AVX2 kernel (its agreement with float32 against int4's:
        # bench/levers.md), one format fewer for the kernels.
        head = {"int4": "int8", AVX2_INT4: AVX2_BFLOAT16}.get(name, name)
        lm_head = make_linear(head, model.lm_head.weight.detach().to(self.device, copy=True), arena)  # as param()
        if name not in C_PRECISIONS:
            return PrecisionKernels(name, layers, lm_head)
        stack = DecodeStack.build(self.shape, layers, self.norms, (self.cos, self.sin_signed))
        return PrecisionKernels(name, layers, lm_head, KernelOps(), stack)

    def release_source(self) -> None:
        self._source = None


def rope_tables(
    model: LlamaForCausalLM, max_len: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin per position, [max_len, head_dim], computed as transformers' LlamaRotaryEmbedding
    does (its own inv_freq and attention scaling, float32 products), so the rotation matches it exactly.

    rotate_half(x) * sin == roll(x, head_dim / 2) * cat(-sin_half, sin_half): one roll instead of two slices,
    a negation and a cat per step."""
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.detach().to(device=device, dtype=torch.float32)
    positions = torch.arange(max_len, device=device, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    cos = angles.cos() * rotary.attention_scaling
    sin = angles.sin() * rotary.attention_scaling
    half = sin.shape[-1] // 2
    sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
    return cos.to(dtype), sin_signed.to(dtype)


def forward(parts: LlamaParts, precision: PrecisionKernels, cache: SlotCache, step: StepInputs) -> torch.Tensor:
    """Logits [rows, vocab] after each row's `last` token; writes every real token's K and V into the cache."""
    x = F.embedding(step.input_ids, parts.embedding)
    if precision.decode_stack is not None and precision.decode_stack.can_run(step):
        precision.decode_stack(x, cache, step)
    else:
        layers_forward(parts, precision, cache, step, x)
    rows = x.shape[0]
    x = x[:, -1] if step.last is None else x[torch.arange(rows, device=x.device), step.last]
    if step.output_order is not None:
        x = x[step.output_order]
    # Only the positions that need a token go through the 49152-wide output layer.
    h = precision.ops.rms_norm(x, parts.norms.final, parts.shape.eps)[:, None]  # [rows, 1, hidden]
    matmul = _matmul(precision, [1] * rows if _by_row(step) else None)
    return matmul(precision.lm_head, h)[:, 0].float()


def layers_forward(
    parts: LlamaParts, precision: PrecisionKernels, cache: SlotCache, step: StepInputs, x: torch.Tensor
) -> None:
    """Every layer on the residual stream x [rows, tokens, hidden], in place."""
    shape = parts.shape
    rows, tokens = step.input_ids.shape
    heads, rotated = shape.heads, shape.heads + shape.kv_heads
    ops, matmul = precision.ops, _matmul(precision, step.counts if _by_row(step) else None)
    attend = ops.attention if not _by_row(step) else partial(row_by_row_attention, ops)
    rotate = ops.rotation(parts, step)
    for index, layer in enumerate(precision.layers):
        h = ops.rms_norm(x, parts.norms.inputs[index], shape.eps)
        qkv = matmul(layer.qkv, h).view(rows, tokens, rotated + shape.kv_heads, shape.head_dim)
        rotate(qkv, rotated)  # q and k rotated in place: qkv's k and v heads go to the cache as-is
        keys, values = cache.write(index, step, qkv[:, :, heads:])
        x += matmul(layer.out, attend(qkv[:, :, :heads], keys, values, step, shape))
        h = ops.rms_norm(x, parts.norms.post_attention[index], shape.eps)
        x += matmul(layer.down, ops.silu_mul(matmul(layer.gate_up, h)))


Matmul = Callable[[Linear, torch.Tensor], torch.Tensor]  # (weight, x [rows, tokens, features]) -> [rows, tokens, out]


def _by_row(step: StepInputs) -> bool:
    """A prefill of several rows: what depends on the batch runs row by row (StepInputs.counts)."""
    return step.counts is not None and len(step.counts) > 1


def _matmul(precision: PrecisionKernels, counts: list[int] | None) -> Matmul:
    """The matmul of a step: one call for all rows, or, given each row's real tokens where the precision's
    kernels are not batch-exact, one call per row on exactly those tokens."""
    if precision.batch_exact or counts is None:
        return lambda linear, x: linear(x)
    return lambda linear, x: _padded([linear(x[row : row + 1, :count]) for row, count in enumerate(counts)], x)


def row_by_row_attention(
    ops: TorchOps, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, step: StepInputs, shape: Shape
) -> torch.Tensor:
    """The ops' attention of each row alone, over exactly its real tokens and the positions they see, with the
    positions and mask a prefill of that row alone has (and so the same kernel: the AVX2 ops take a one-token
    row to the decode kernel): SDPA's result depends on the shapes it is given (padded to a group's widest
    prompt, a row's logits moved by up to 5e-5)."""
    counts, mask = step.counts, step.mask
    assert counts is not None and mask is not None
    rows, width = q.shape[:2]
    ends = (step.positions[:, -1] + 1).tolist()  # padding repeats the last real position
    grouped = mask.view(rows, shape.groups, width, -1)
    outputs = []
    for row, (count, end) in enumerate(zip(counts, ends)):
        row_mask = grouped[row, :, :count, :end].reshape(1, 1, shape.groups * count, end)
        alone = replace(step, positions=step.positions[row : row + 1, :count], mask=row_mask)
        window = slice(row, row + 1), slice(None), slice(None, end)
        outputs.append(ops.attention(q[row : row + 1, :count], keys[window], values[window], alone, shape))
    return _padded(outputs, q)


def _padded(rows: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Rows [1, count, features] of different counts -> [rows, like's tokens, features], zeros after each count
    (the padding positions, which nothing reads)."""
    out = rows[0].new_zeros(len(rows), like.shape[1], rows[0].shape[-1])
    for index, row in enumerate(rows):
        out[index, : row.shape[1]] = row[0]
    return out


def rope_(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """transformers' x * cos + rotate_half(x) * sin, into x itself ([rows, tokens, heads, head_dim]): both
    products are computed before addcmul writes, so nothing reads what it overwrites."""
    torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed, out=x)


def attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, shape: Shape
) -> torch.Tensor:
    """q [rows, tokens, heads, head_dim] against the cache's [rows, kv_heads, attended, head_dim].

    GQA without copying the cache: the query heads that share a KV head become extra queries of that head,
    [rows, kv_heads, groups * tokens, head_dim] (the step's mask is built for that layout). Returns
    [rows, tokens, heads * head_dim]."""
    rows, tokens = q.shape[:2]
    q = q.view(rows, tokens, shape.kv_heads, shape.groups, shape.head_dim).permute(0, 2, 3, 1, 4)
    q = q.reshape(rows, shape.kv_heads, shape.groups * tokens, shape.head_dim)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
    out = out.view(rows, shape.kv_heads, shape.groups, tokens, shape.head_dim).permute(0, 3, 1, 2, 4)
    return out.reshape(rows, tokens, shape.heads * shape.head_dim)
