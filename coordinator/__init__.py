"""Control plane: the wire protocol, the coordinator (shard fan-out, exact top-k merge with
:func:`retriever.search.merge_topk`, failover; as its own process or inline in a client), the
retrieval/decoding pipeline, speculative prefill and the RAGCache knowledge tree.
"""
