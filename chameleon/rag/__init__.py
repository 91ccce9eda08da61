"""Retrieval-augmented generation: corpora and passages, the embedder, the RAG pipeline, the
document KV cache's tensors on the engines, and kNN-LM."""
