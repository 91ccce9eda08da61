"""The KV of sequences decoded together, row for row, and the step that feeds each its next token.

Rows of different lengths share one cache, left-padded, with an attention mask over the padding
and each row's own positions. With the engine's
:class:`~chameleon.engines.llama_decode.LlamaDecoder` the cache is a set of preallocated buffers
that each step writes one column of; other models step through transformers.
"""

from __future__ import annotations

from retriever.errors import InvalidInput


class DecodeBatch:
    """Sequences of different lengths decoded together on one KV cache.

    Each row's KV is left-padded to the longest, with an attention mask over the padding; every
    step passes each row's own position. A row alone is never padded and runs exactly the
    model's plain decode step. Rows are in join order; ``keep`` drops the others.

    With the engine's :class:`~chameleon.engines.llama_decode.LlamaDecoder`, the KV lives in its
    buffers (``kv_buffers``: float32, keys transposed) with room for more columns (``room_for``),
    each step writing its column in place; other models decode through transformers, whose cache
    grows by concatenation. What leaves the batch (``own_cache``, ``row_head``) is a copy in
    transformers' shape and the model's dtype.
    """

    def __init__(self, engine):
        self.model, self.device, self.decoder = engine.model, engine.device, engine.decoder
        self.keys: list = []  # per layer; columns 0..length-1 hold KV (the decoder's layout, or transformers')
        self.values: list = []
        self.length = 0
        self.mask = None  # (rows, length), 0 over padding

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def columns(self, rows=slice(None), start: int = 0, stop: int | None = None) -> list[tuple]:
        """Each layer's (keys, values) of ``rows`` over columns ``start:stop`` (default: those in
        use), in transformers' shape: views of the batch's tensors, not to be kept."""
        stop = self.length if stop is None else stop
        if self.decoder is not None:
            return self.decoder.kv_columns(self.keys, self.values, rows, start, stop)
        return [(k[rows, :, start:stop], v[rows, :, start:stop]) for k, v in zip(self.keys, self.values)]

    def join(self, cache) -> None:
        """Add a prefilled sequence's KV cache as the last row, left-padding whichever side is shorter."""
        import torch
        from torch.nn.functional import pad

        layers = [(layer.keys, layer.values) for layer in cache.layers]
        mask = torch.ones(1, layers[0][0].shape[2], dtype=torch.long, device=self.device)
        if self.mask is not None:
            length = max(self.length, mask.shape[1])

            def left_pad(tensor, to):  # (rows, heads, time, dim) or (rows, time)
                extra = to - tensor.shape[-2 if tensor.dim() == 4 else -1]
                return pad(tensor, (0, 0, extra, 0) if tensor.dim() == 4 else (extra, 0))

            layers = [
                (torch.cat([left_pad(bk, length), left_pad(k, length)]), torch.cat([left_pad(bv, length), left_pad(v, length)]))
                for (bk, bv), (k, v) in zip(self.columns(), layers)
            ]
            mask = torch.cat([left_pad(self.mask, length), left_pad(mask, length)])
        self._hold(layers, mask)

    def prefill(self, prompts: list[list[int]], hidden_states: bool = False):
        """Start an empty batch with ``prompts`` in one forward pass, left-padded; the model's output
        (the last column holds every row's next-token logits)."""
        import torch

        if self.mask is not None:
            raise InvalidInput("prefill starts an empty batch")
        length = max(len(prompt) for prompt in prompts)
        ids = torch.tensor([[0] * (length - len(p)) + list(p) for p in prompts], device=self.device)
        mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        options = {"use_cache": True, "output_hidden_states": hidden_states}
        if len(prompts) == 1:
            out = self.model(ids, **options)
        else:
            positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
            out = self.model(ids, attention_mask=mask, position_ids=positions, **options)
        self._hold([(layer.keys, layer.values) for layer in out.past_key_values.layers], mask)
        return out

    def step(self, tokens: list[int], kv_lengths: list[int], hidden_states: bool = False):
        """Feed one token per row (each row's KV holds ``kv_lengths[row]`` real tokens); the model's
        output (``logits``, and ``hidden_states`` when asked)."""
        import torch
        from transformers import DynamicCache

        last = torch.tensor([[token] for token in tokens], device=self.device)
        mask = torch.cat([self.mask, torch.ones(len(tokens), 1, dtype=self.mask.dtype, device=self.device)], dim=1)
        positions = torch.tensor([[length] for length in kv_lengths], device=self.device)
        if self.decoder is not None:
            self._make_room()
            out = self.decoder.step(last, positions, self.keys, self.values, self.length, None if len(tokens) == 1 else mask, hidden_states)
            self.length += 1
            self.mask = mask
            return out
        options = {"past_key_values": DynamicCache(self.columns()), "use_cache": True, "output_hidden_states": hidden_states}
        if len(tokens) == 1:
            out = self.model(last, **options)
        else:
            out = self.model(last, attention_mask=mask, position_ids=positions, **options)
        self._hold([(layer.keys, layer.values) for layer in out.past_key_values.layers], mask)
        return out

    def own_cache(self, row: int, length: int):
        """Row ``row``'s real KV (its last ``length`` columns), copied so that it does not keep the
        whole batch's KV alive."""
        return self._copy(self.columns(slice(row, row + 1), self.length - length))

    def row_head(self, row: int, length: int, head: int):
        """The KV of the first ``head`` tokens of row ``row`` (whose KV holds ``length`` real
        tokens), copied so that it does not keep the whole batch's KV alive."""
        start = self.length - length
        return self._copy(self.columns(slice(row, row + 1), start, start + head))

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order), dropping columns that are padding in all of them."""
        import torch

        if not rows:
            self.keys, self.values, self.length, self.mask = [], [], 0, None
            return
        index = torch.tensor(rows, device=self.device)
        mask = self.mask[index]
        start = int((mask.sum(dim=0) > 0).nonzero()[0])
        self._hold(self.columns(index, start), mask[:, start:])

    def _hold(self, layers: list[tuple], mask) -> None:
        """Take ``layers`` as the batch's KV. With the decoder, into buffers of our own (which its
        steps write into: never a cache that a prefix shares) with room for more steps."""
        self.length, self.mask = mask.shape[1], mask
        if self.decoder is None:
            self.keys, self.values = [k for k, _ in layers], [v for _, v in layers]
            return
        self.keys, self.values = self.decoder.kv_buffers(layers, room_for(self.length))

    def _make_room(self) -> None:
        if self.length == self.values[0].shape[2]:
            self.keys, self.values = self.decoder.kv_buffers(self.columns(), room_for(self.length + 1))

    def _copy(self, layers: list[tuple]):
        """A transformers cache of a copy of ``layers`` in the model's dtype."""
        from transformers import DynamicCache

        dtype = self.model.dtype
        return DynamicCache([(k.to(dtype, copy=True), v.to(dtype, copy=True)) for k, v in layers])


def room_for(length: int) -> int:
    """Columns to allocate for ``length``: the next multiple of 256 past it, or half as many again
    for long ones, so that growing costs a copy every few hundred steps at most."""
    return max(-(-(length + 1) // 256) * 256, length + length // 2)
