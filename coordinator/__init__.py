"""Control plane: the coordinator (shard fan-out, exact top-k merge with
:func:`retriever.search.merge_topk`, failover; as its own process or inline in a client) and its
client, the retrieval/decoding pipeline, speculative prefill, and the RAGCache knowledge tree with
the prefill cost model its policy weighs. The wire it speaks is :mod:`retriever.wire`.
"""
