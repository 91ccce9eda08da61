"""Control plane: wire protocol, router (shard fan-out, exact top-k merge, failover), the
retrieval/decoding pipeline and the RAGCache knowledge tree. Filled in by the retrieval-tier issue;
the exact shard merge it will use is :func:`retriever.search.merge_topk`.
"""
