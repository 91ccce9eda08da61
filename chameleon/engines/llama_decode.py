"""One decode step of a Llama-family model written out in torch operations, on KV buffers that
the caller preallocates and this step writes into.

transformers' decode step of a small model on CPU goes mostly to things other than its matrix
products: per-module dispatch, mask and cache bookkeeping, a KV cache that grows by concatenation
(every step copies every layer's whole KV), and attention through the CPU flash-attention kernel,
slow for one query (benchmarks/RESULTS.md, 2026-12-07). This step runs the same arithmetic with the
query, key and value projections in one matrix product and the gate and up projections in another
(their weights fused once; the model's own modules keep views of them, so nothing is held twice),
the model's own norms and rotary embeddings, each new key and value written into its column of the
caller's buffers, and attention as two products in float32 (on bf16 models a little more precise
than transformers', and 2-3x faster on CPU than bf16 products of these shapes). In float32 its
tokens are transformers' (tested). Prefill stays transformers' (one pass of large matrix
products, where dispatch does not count).

Models it cannot run exactly are refused with the reason (``unsupported``); the engine decodes
them with transformers, as before.
"""

from __future__ import annotations

from dataclasses import dataclass

from retriever.errors import InvalidInput

# Model types whose decoder layer is Llama's: RMSNorm, rotary attention with grouped KV heads
# (biases allowed: Qwen2's), a gated MLP, tied or untied output embeddings.
LLAMA_LIKE = {"llama", "mistral", "qwen2"}
# What a decode step multiplies by: the model's own weights, or a copy quantized to 8 bits per
# row, or to 4 bits per group of 32 inputs (the output layer at 8 bits). A decode step of a small
# model is bound by memory bandwidth, not arithmetic: fewer bytes, faster steps. 4 bits in groups
# of 32 with a scale and a minimum is the layout of a Q4_1 GGUF file's matrices (the built-in
# model's): quantizing its weights again that way gives back the file's own numbers. ``auto`` is
# int4 where that holds for every matrix of the layers (nothing is lost), the model's weights
# otherwise.
WEIGHTS = {"auto", "model", "int8", "int4"}
INT4_GROUP = 32
# How far a weight may sit from its int4 group's grid and still count as on it: bf16 rounding of
# the values and of the grid's ends moves a weight by about 1/170 of the group's largest; a matrix
# that was not on such a grid is off it by up to half a step, 1/30 of that or more.
INT4_GRID_TOLERANCE = 1 / 64


def unsupported(model) -> str | None:
    """Why ``model`` cannot be decoded by :class:`LlamaDecoder` (None: it can)."""
    config = model.config
    if config.model_type not in LLAMA_LIKE:
        return f"model type {config.model_type!r} is not one of {sorted(LLAMA_LIKE)}"
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        return f"its attention looks back {window} tokens only (a sliding window)"
    if config._attn_implementation != "sdpa":
        return f"its attention runs as {config._attn_implementation!r}, not 'sdpa'"
    for layer in model.model.layers:
        for fused in ((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj), (layer.mlp.gate_proj, layer.mlp.up_proj)):
            if len({p.bias is None for p in fused}) > 1:
                return "some of its projections have a bias and some do not"
    return None


@dataclass
class StepOutput:
    """What a decode step gives, shaped as transformers' output: ``logits`` (rows, 1, vocab) and
    ``hidden_states``, whose last is the final normalised hidden state (rows, 1, hidden)."""

    logits: object
    hidden_states: tuple


class LlamaDecoder:
    """The decode step of a loaded Llama-family model (``unsupported(model)`` must be None), on
    ``weights`` (``WEIGHTS``; ``self.weights`` says what ``auto`` chose)."""

    def __init__(self, model, weights: str = "model"):
        import torch

        if weights not in WEIGHTS:
            raise InvalidInput(f"decode weights {weights!r}: one of {sorted(WEIGHTS)}")
        config, inner = model.config, model.model
        if weights == "auto":
            weights = (
                "int4" if all(on_int4_grid(m.weight.detach()) for layer in inner.layers for m in layer_projections(layer)) else "model"
            )
        self.weights = weights
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.embed, self.norm, self.rotary = inner.embed_tokens, inner.norm, inner.rotary_emb
        self.layers = [_FusedLayer(layer, weights, torch) for layer in inner.layers]
        self.lm_head = DecodeLinear(model.lm_head.weight.detach(), model.lm_head.bias, "int8" if weights == "int4" else weights, torch)

    def kv_buffers(self, layers: list[tuple], capacity: int) -> tuple[list, list]:
        """Buffers for ``capacity`` columns holding ``layers`` (each (keys, values) of
        transformers' shape: rows, kv heads, columns, head dim) in their first columns: float32,
        and keys transposed (rows, kv heads, head dim, capacity), so that a query's scores are one
        product with no copy (bf16 products of these shapes are slow on CPU)."""
        import torch

        keys, values = [], []
        for k, v in layers:
            rows, heads, length, dim = k.shape
            keys.append(torch.empty(rows, heads, dim, capacity, dtype=torch.float32, device=k.device))
            values.append(torch.empty(rows, heads, capacity, dim, dtype=torch.float32, device=v.device))
            keys[-1][..., :length] = k.transpose(2, 3)
            values[-1][:, :, :length] = v
        return keys, values

    def kv_columns(self, keys: list, values: list, rows, start: int, stop: int) -> list[tuple]:
        """Columns ``start:stop`` of ``rows`` (a slice or an index tensor) of the buffers, in
        transformers' shape (views where they can be: still float32)."""
        return [(k[rows, :, :, start:stop].transpose(2, 3), v[rows, :, start:stop]) for k, v in zip(keys, values)]

    def step(self, tokens, positions, keys: list, values: list, column: int, mask=None, hidden_states: bool = False) -> StepOutput:
        """Feed ``tokens`` (rows, 1) at ``positions`` (rows, 1); each layer's new key and value go
        into column ``column`` of ``keys[layer]`` and ``values[layer]`` (``kv_buffers``), and
        attention reads columns ``0..column``, of which ``mask`` (rows, column + 1; None: all) says
        which are real."""
        import torch
        from transformers.models.llama.modeling_llama import rotate_half

        rows, heads, kv_heads, dim = tokens.shape[0], self.heads, self.kv_heads, self.head_dim
        hidden = self.embed(tokens)
        cos, sin = self.rotary(hidden, positions)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (rows, 1, 1, head dim): over every head
        if mask is not None:  # True over padding
            mask = ~mask.bool()[:, None, None, :]
        for layer, key_buffer, value_buffer in zip(self.layers, keys, values):
            residual = hidden
            projected = layer.qkv(layer.input_norm(hidden)).view(rows, 1, heads + 2 * kv_heads, dim)
            rotated = projected[:, :, : heads + kv_heads]  # the queries' and keys' heads, rotated at once
            rotated = rotated * cos + rotate_half(rotated) * sin
            key_buffer[..., column] = rotated[:, 0, heads:]
            value_buffer[:, :, column] = projected[:, 0, heads + kv_heads :]
            # one query per head, grouped by the KV head it reads: (rows, kv heads, queries per kv head, dim)
            grouped = rotated[:, 0, :heads].reshape(rows, kv_heads, heads // kv_heads, dim).float()
            scores = torch.matmul(grouped, key_buffer[..., : column + 1]) * layer.scaling
            if mask is not None:
                scores = scores.masked_fill(mask, float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            attended = torch.matmul(weights, value_buffer[:, :, : column + 1]).to(hidden.dtype).reshape(rows, 1, -1)
            hidden = residual + layer.o_proj(attended)
            residual = hidden
            gate, up = layer.gate_up(layer.post_norm(hidden)).chunk(2, dim=-1)
            hidden = residual + layer.down_proj(layer.act(gate) * up)
        hidden = self.norm(hidden)
        return StepOutput(self.lm_head(hidden), (hidden,) if hidden_states else ())


def layer_projections(layer) -> list:
    """A decoder layer's seven projections (their modules), the matrices a decode step multiplies by."""
    attention, mlp = layer.self_attn, layer.mlp
    return [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def int4_groups(weight):
    """``weight`` (rows, inputs) in groups of :data:`INT4_GROUP` inputs, each a scale times a
    4-bit code plus its minimum: (codes (rows, inputs) int32, scales and minimums (rows, groups, 1)
    float32)."""
    import torch

    rows, inputs = weight.shape
    if inputs % INT4_GROUP:
        raise InvalidInput(f"int4 decode weights need inputs in groups of {INT4_GROUP}; a matrix has {inputs}")
    grouped = weight.float().reshape(rows, inputs // INT4_GROUP, INT4_GROUP)
    low = grouped.amin(dim=-1, keepdim=True)
    scales = ((grouped.amax(dim=-1, keepdim=True) - low) / 15).clamp(min=1e-12)
    codes = ((grouped - low) / scales).round().clamp(0, 15).to(torch.int32).reshape(rows, inputs)
    return codes, scales, low


def on_int4_grid(weight) -> bool:
    """Whether every group of :data:`INT4_GROUP` inputs of ``weight`` is a scale times 4-bit codes
    plus a minimum, up to bf16 rounding (a Q4_1 GGUF's matrices, dequantized), so that its int4
    copy loses nothing."""
    if weight.shape[1] % INT4_GROUP:
        return False
    codes, scales, low = int4_groups(weight)
    grouped = weight.float().reshape(*scales.shape[:2], INT4_GROUP)
    error = (codes.reshape(grouped.shape) * scales + low - grouped).abs().amax(dim=-1)
    return bool((error <= INT4_GRID_TOLERANCE * grouped.abs().amax(dim=-1)).all())


class _FusedLayer:
    """A decoder layer's weights, the query/key/value and gate/up projections each fused into one
    matrix; the layer's own projections become views of it (one copy of the weights)."""

    def __init__(self, layer, weights: str, torch):
        attention, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = layer.input_layernorm, layer.post_attention_layernorm
        self.scaling, self.act = attention.scaling, mlp.act_fn
        self.qkv = DecodeLinear(*_fuse([attention.q_proj, attention.k_proj, attention.v_proj], torch), weights, torch)
        self.gate_up = DecodeLinear(*_fuse([mlp.gate_proj, mlp.up_proj], torch), weights, torch)
        self.o_proj = DecodeLinear(attention.o_proj.weight.detach(), attention.o_proj.bias, weights, torch)
        self.down_proj = DecodeLinear(mlp.down_proj.weight.detach(), mlp.down_proj.bias, weights, torch)


class DecodeLinear:
    """``x @ weight.T + bias`` on the model's weights, or on a quantized copy of them (``WEIGHTS``)."""

    def __init__(self, weight, bias, weights: str, torch):
        self.bias = None if bias is None else bias.detach()
        self.weight, self.weights = weight, weights
        if weights == "int8":
            scales = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
            self.weight = (weight.float() / scales[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.scales = scales.to(weight.dtype)
        elif weights == "int4":
            codes, scales, low = int4_groups(weight)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            # the kernel's layout: (groups, rows, [scale, the value of code 8])
            self.scales = torch.stack([scales[..., 0], (low + 8 * scales)[..., 0]], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)
        self._ops = torch.nn.functional.linear, torch.ops.aten._weight_int8pack_mm, torch.ops.aten._weight_int4pack_mm_for_cpu

    def __call__(self, x):
        linear, int8, int4 = self._ops
        if self.weights == "model":
            return linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1])
        out = int8(flat, self.weight, self.scales) if self.weights == "int8" else int4(flat, self.weight, INT4_GROUP, self.scales)
        out = out.reshape(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias


def _fuse(projections: list, torch):
    """One weight (and bias) for ``projections`` stacked by rows; each projection's parameters
    become views into it, so the model's own forward reads the same memory."""
    weight = torch.cat([p.weight.detach() for p in projections])
    bias = torch.cat([p.bias.detach() for p in projections]) if projections[0].bias is not None else None
    start = 0
    for p in projections:
        rows = p.weight.shape[0]
        p.weight = torch.nn.Parameter(weight[start : start + rows], requires_grad=False)
        if bias is not None:
            p.bias = torch.nn.Parameter(bias[start : start + rows], requires_grad=False)
        start += rows
    return weight, bias
