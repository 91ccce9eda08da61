"""The document KV cache over each engine: the knowledge tree (``coordinator.kv_cache``) decides,
this module keeps the engine's KV of the prompt template and of each document, or follows where
the engine keeps it.

A prompt is segments (``RagPipeline.prompt_segments``): the template, one per passage, then the
question. Both caches take ``lookup(segments, doc_ids)`` before prefill and ``keep(access,
segments, generation)`` after it, and ``order(doc_ids)`` before the prompt is built. Requests
with another template (a custom system prompt, a conversation) bypass the cache.

- ``DocumentKVCache`` (torch engine): ``lookup`` asks the tree for the request's path and joins
  the KV of the template and of the cached documents into one prefix, when it is long enough to
  pay (``chameleon.engines.base.worth_continuing``: a quarter of the prompt); ``keep`` cuts the KV of the
  documents the tree admitted out of the request's own. A node's KV has a device copy and, once
  swapped out, a host copy (on a CPU host both are host memory; the device tier is the bounded
  hot pool).
- ``VllmDocumentCache`` (vLLM engine): vLLM keeps the KV in blocks and evicts it itself (automatic
  prefix caching); the tree mirrors what is resident, corrected after every request by what vLLM
  reports it reused, and puts each request's documents in their canonical order, so that a
  resident document prefix comes first and vLLM finds it.

Canonical order (``order``) changes where passages stand in the prompt, and so their numbers: a
document the tree holds after others comes after them, wherever retrieval ranked it. It is on for
vLLM, whose prefix cache only reuses a prompt's exact head, and opt-in for the torch cache.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from chameleon.engines.base import Generation, KVPrefix, worth_continuing
from coordinator.kv_cache import HOST, Access, KnowledgeTree, Node
from coordinator.prefill_profile import PrefillProfile


@dataclass
class _KV:
    device: list | None = None  # per layer (keys, values), each (1, heads, tokens, dim)
    host: list | None = None


def _moved(layers: list, device) -> list:
    return [(k.to(device), v.to(device)) for k, v in layers]


def kv_bytes_per_token(engine) -> int:
    """Bytes of K and V per token over all layers of a torch engine's model, in its dtype."""
    return model_kv_bytes_per_token(engine.model.config, engine.model.dtype)


def model_kv_bytes_per_token(config, dtype) -> int:
    """Bytes of K and V per token over all layers of a model with this Hugging Face ``config``, in ``dtype`` (torch)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * dtype.itemsize


class _TreeCache:
    """What both engines' caches share: the template they cache (the first request's unless
    given), its knowledge tree, the counters the server exports and the canonical order."""

    def __init__(
        self,
        policy: str,
        device_bytes: int,
        host_bytes: int,
        bytes_per_token: int,
        profile: PrefillProfile | None,
        template: list[int] | None,
        canonical_order: bool,
    ):
        self.policy, self.device_bytes, self.host_bytes, self.profile = policy, device_bytes, host_bytes, profile
        self.bytes_per_token, self.canonical_order = bytes_per_token, canonical_order
        self.tree: KnowledgeTree | None = None
        self.template: list[int] | None = None
        if template is not None:
            self._plant(template)
        self.stats = {"lookups": 0, "bypassed": 0, "device_hit_tokens": 0, "host_hit_tokens": 0, "computed_tokens": 0}
        self._lock = threading.Lock()

    def order(self, doc_ids: list[str]) -> list[int]:
        """Where each of a request's documents (ids in retrieval order) goes in the prompt, as
        positions in ``doc_ids``: the tree's canonical order, or retrieval order when it is off."""
        with self._lock:
            if not self.canonical_order or self.tree is None:
                return list(range(len(doc_ids)))
            return self.tree.canonical_order(doc_ids)

    def _access(self, segments: list[list[int]], doc_ids: list[str]) -> Access | None:
        """The tree's decision for this prompt, or None when it bypasses the cache; under the lock."""
        if len(segments) < 3:  # no passages: nothing to cache, and no template to learn from
            self.stats["bypassed"] += 1
            return None
        if self.tree is None:
            self._plant(segments[0])
        if segments[0] != self.template:
            self.stats["bypassed"] += 1
            return None
        self.stats["lookups"] += 1
        return self.tree.access([(doc, len(seg)) for doc, seg in zip(doc_ids, segments[1:-1])], len(segments[-1]))

    def _plant(self, template: list[int]) -> None:
        self.template = list(template)
        self.tree = KnowledgeTree(self.policy, self.device_bytes, self.host_bytes, self.bytes_per_token, len(self.template), self.profile)


class DocumentKVCache(_TreeCache):
    """The torch engine's cache: the tree decides, this class keeps, moves and frees the tensors."""

    def __init__(
        self,
        engine,
        policy: str = "pgdsf",
        device_bytes: int = 1 << 30,
        host_bytes: int = 4 << 30,
        profile: PrefillProfile | None = None,
        template: list[int] | None = None,
        canonical_order: bool = False,
    ):
        self.engine = engine
        super().__init__(policy, device_bytes, host_bytes, kv_bytes_per_token(engine), profile, template, canonical_order)

    def lookup(self, segments: list[list[int]], doc_ids: list[str]) -> tuple[KVPrefix | None, Access | None]:
        """The reusable KV prefix for this prompt (or None) and the tree's decision, for ``keep``."""
        import torch
        from transformers import DynamicCache

        with self._lock:
            access = self._access(segments, doc_ids)
            if access is None:
                return None, None
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
            root = self.tree.root.handle
            if root is None or not worth_continuing(len(self.template) + sum(n.tokens for n in usable), sum(map(len, segments))):
                self.stats["computed_tokens"] += access.computed_tokens + sum(n.tokens for n in hits)
                return None, access
            self.stats["device_hit_tokens"] += sum(n.tokens for n in usable if n in access.device_hits)
            self.stats["host_hit_tokens"] += sum(n.tokens for n in usable if n in access.host_hits)
            self.stats["computed_tokens"] += access.computed_tokens + sum(n.tokens for n in unfilled)
            parts = [root.device, *(node.handle.device for node in usable)]
            layers = [
                (torch.cat([p[i][0] for p in parts], dim=2), torch.cat([p[i][1] for p in parts], dim=2)) for i in range(len(parts[0]))
            ]
            tokens = [t for segment in segments[: 1 + len(usable)] for t in segment]
            return KVPrefix(tokens, DynamicCache(layers)), access

    def keep(self, access: Access | None, segments: list[list[int]], generation: Generation) -> None:
        """Store the KV of what ``access`` admitted, cut from ``generation.state`` (the request's KV);
        what a cancelled prefill did not reach stays without KV (the next request that uses it fills it)."""
        if access is None:
            return
        layers = [(layer.keys, layer.values) for layer in generation.state.cache.layers]

        def cut(start: int, end: int) -> _KV:
            return _KV(device=[(k[:, :, start:end].clone(), v[:, :, start:end].clone()) for k, v in layers])

        computed = len(generation.state.tokens)  # short of the prompt when its prefill was cancelled
        with self._lock:
            if self.tree.root.handle is None and len(self.template) <= computed:
                self.tree.root.handle = cut(0, len(self.template))
            starts = [len(self.template)]
            for segment in segments[1:-1]:
                starts.append(starts[-1] + len(segment))
            for node in access.inserted:
                depth = len(node.path) - 1
                end = starts[depth] + node.tokens
                if node.on_device and end <= computed:  # not evicted by another request meanwhile, and computed
                    node.handle = cut(starts[depth], end)

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


class VllmDocumentCache(_TreeCache):
    """The tree over vLLM's automatic prefix cache, which holds the KV and evicts it on its own
    (least recently used blocks first, a request's last blocks before its first). The tree is a
    belief, one device tier as large as vLLM's KV cache and LRU like it; every reply's
    ``cached_tokens`` corrects it. Counters are vLLM's: every reused token is a device hit.

    ``block_size``: vLLM's KV block (it reuses whole blocks only); ``device_bytes``: its KV cache."""

    def __init__(self, block_size: int, device_bytes: int, bytes_per_token: int, template: list[int] | None = None):
        super().__init__("lru", device_bytes, 0, bytes_per_token, None, template, canonical_order=True)
        self.block_size = block_size

    @classmethod
    def of(cls, engine, device_bytes: int, template: list[int] | None = None) -> VllmDocumentCache:
        """The cache of a ``VllmEngine``: as large as its KV cache where vLLM says, else ``device_bytes``."""
        per_token = model_kv_bytes_per_token(engine.config, engine.dtype)
        return cls(engine.kv_block_size, engine.kv_cache_tokens * per_token or device_bytes, per_token, template)

    def lookup(self, segments: list[list[int]], doc_ids: list[str]) -> tuple[None, Access | None]:
        """No prefix (vLLM finds the cached head of any prompt itself) and the tree's decision, for ``keep``."""
        with self._lock:
            return None, self._access(segments, doc_ids)

    def keep(self, access: Access | None, segments: list[list[int]], generation: Generation) -> None:
        """Count what vLLM reused for this prompt and correct the tree where vLLM had evicted what it
        held: ``generation`` is the reply to exactly ``segments`` (a later step of the same answer,
        a longer prompt, is left alone, and so is a cancelled request: vLLM reported nothing for it,
        and the next request over its documents corrects the tree)."""
        if access is None or generation.finish_reason == "cancelled" or generation.prompt_tokens != sum(map(len, segments)):
            return
        with self._lock:
            self.stats["device_hit_tokens"] += generation.cached_tokens
            self.stats["computed_tokens"] += generation.prompt_tokens - generation.cached_tokens
            held = [self.tree.root, *access.device_hits]  # in prompt order; there is no host tier here
            evicted = self._first_evicted(held, segments, generation.cached_tokens)
            if evicted is not None:
                path = held + access.inserted
                self._forget_beside(path[path.index(evicted) :])

    def _first_evicted(self, held: list[Node], segments: list[list[int]], cached: int) -> Node | None:
        """Of what the tree held for this prompt (the root, then its hits in prompt order), the first
        node whose blocks vLLM no longer had, or None when vLLM reused all it could.

        vLLM reuses whole blocks of the prompt's head and always computes the last prompt token, so
        of ``held`` it can reuse the whole blocks up to ``min(held tokens, prompt - 1)``; the first
        block it did not reuse starts at ``cached``, in the node that holds that token."""
        ends = list(itertools.accumulate(map(len, segments)))  # ends[d]: the end of the d-th document (0: the template)
        if cached >= min(ends[len(held) - 1], ends[-1] - 1) // self.block_size * self.block_size:
            return None
        return next(node for node, end in zip(held, ends) if end > cached)

    def _forget_beside(self, path: list[Node]) -> None:
        """Forget what hangs off ``path``, the request's nodes from the first one vLLM had evicted:
        vLLM evicts a block's descendants no later than the block, so they are gone too, while the
        path itself was computed again by this request and is resident."""
        for node, successor in zip(path, [*path[1:], None]):
            for child in list(node.children.values()):
                if child is not successor:
                    self.tree.forget(child)
