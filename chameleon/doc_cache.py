"""The document KV cache's tensors: the knowledge tree (``coordinator.kv_cache``) decides, this
module keeps, moves and frees the torch engine's KV of the prompt template and of each document.

A prompt is segments (``RagPipeline.prompt_segments``): the template, one per passage, then the
question. Before prefill, ``lookup`` asks the tree for the request's path and joins the KV of the
template and of the cached documents into one prefix; after it, ``keep`` cuts the KV of the
documents the tree admitted out of the request's own. A node's KV has a device copy and, once
swapped out, a host copy (on a CPU host both are host memory; the device tier is the bounded hot
pool). Requests with another template (a custom system prompt, a conversation) bypass the cache.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from chameleon.llm import KVPrefix
from coordinator.kv_cache import HOST, Access, KnowledgeTree
from coordinator.prefill_profile import PrefillProfile


@dataclass
class _KV:
    device: list | None = None  # per layer (keys, values), each (1, heads, tokens, dim)
    host: list | None = None


def _moved(layers: list, device) -> list:
    return [(k.to(device), v.to(device)) for k, v in layers]


def kv_bytes_per_token(engine) -> int:
    """Bytes of K and V per token over all layers, in the engine's dtype."""
    config = engine.model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * engine.model.dtype.itemsize


class DocumentKVCache:
    """``template``: the prompt head whose requests are cached (default: the first request's)."""

    def __init__(
        self, engine, policy: str = "pgdsf", device_bytes: int = 1 << 30, host_bytes: int = 4 << 30,
        profile: PrefillProfile | None = None, template: list[int] | None = None,
    ):  # fmt: skip
        self.engine = engine
        self.policy, self.device_bytes, self.host_bytes, self.profile = policy, device_bytes, host_bytes, profile
        self.bytes_per_token = kv_bytes_per_token(engine)
        self.tree: KnowledgeTree | None = None
        self.template: list[int] | None = None
        if template is not None:
            self._plant(template)
        self.stats = {"requests": 0, "bypassed": 0, "device_hit_tokens": 0, "host_hit_tokens": 0, "computed_tokens": 0}
        self._lock = threading.Lock()

    def lookup(self, segments: list[list[int]], doc_ids: list[str]) -> tuple[KVPrefix | None, Access | None]:
        """The reusable KV prefix for this prompt (or None) and the tree's decision, for ``keep``."""
        import torch
        from transformers import DynamicCache

        with self._lock:
            if len(segments) < 3:  # no passages: nothing to cache, and no template to learn from
                self.stats["bypassed"] += 1
                return None, None
            if self.tree is None:
                self._plant(segments[0])
            if segments[0] != self.template:
                self.stats["bypassed"] += 1
                return None, None
            access = self.tree.access([(doc, len(seg)) for doc, seg in zip(doc_ids, segments[1:-1])], len(segments[-1]))
            self._apply(access)
            hits = access.device_hits + access.host_hits
            hits.sort(key=lambda node: len(node.path))
            usable = []
            for node in hits:  # a node admitted by a request still in prefill, or swapped out before then, has no KV
                if node.handle is None or node.handle.device is None:
                    break
                usable.append(node)
            unfilled = hits[len(usable) :]
            access.inserted[:0] = unfilled  # computed by this request after all: its KV fills them
            self.stats["requests"] += 1
            self.stats["device_hit_tokens"] += sum(n.tokens for n in usable if n in access.device_hits)
            self.stats["host_hit_tokens"] += sum(n.tokens for n in usable if n in access.host_hits)
            self.stats["computed_tokens"] += access.computed_tokens + sum(n.tokens for n in unfilled)
            root = self.tree.root.handle
            if root is None:
                return None, access
            parts = [root.device, *(node.handle.device for node in usable)]
            layers = [(torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2)) for i in range(len(parts[0]))]
            tokens = [t for segment in segments[: 1 + len(usable)] for t in segment]
            return KVPrefix(tokens, DynamicCache(layers)), access

    def keep(self, access: Access | None, segments: list[list[int]], state: KVPrefix) -> None:
        """Store the KV of what ``access`` admitted, cut from ``state`` (the request's KV)."""
        if access is None:
            return
        layers = [(layer.keys, layer.values) for layer in state.cache.layers]

        def cut(start: int, end: int) -> _KV:
            return _KV(device=[(k[:, :, start:end].clone(), v[:, :, start:end].clone()) for k, v in layers])

        with self._lock:
            if self.tree.root.handle is None:
                self.tree.root.handle = cut(0, len(self.template))
            starts = [len(self.template)]
            for segment in segments[1:-1]:
                starts.append(starts[-1] + len(segment))
            for node in access.inserted:
                if node.on_device:  # not evicted by another request meanwhile
                    depth = len(node.path) - 1
                    node.handle = cut(starts[depth], starts[depth] + node.tokens)

    def _plant(self, template: list[int]) -> None:
        self.template = list(template)
        self.tree = KnowledgeTree(self.policy, self.device_bytes, self.host_bytes, self.bytes_per_token, len(self.template), self.profile)

    def _apply(self, access: Access) -> None:
        for node in access.swapped_out:
            if node.handle is not None and node.handle.device is not None:
                node.handle.host = _moved(node.handle.device, "cpu")
        for node in [*access.swapped_out, *(n for n, tier in access.dropped if tier != HOST)]:
            if node.handle is not None:
                node.handle.device = None
        for node in access.host_hits:
            if node.handle is not None and node.handle.host is not None:
                node.handle.device = _moved(node.handle.host, self.engine.device)
        for node, tier in access.dropped:
            if tier == HOST and node.handle is not None:
                node.handle.host = None
