"""Chameleon's inference tier and face, in rooms:

- ``engines/``: the LLM engines (torch, continuous batching, vLLM), sampling, prefill timing;
- ``rag/``: corpora, the embedder, the RAG pipeline, the document KV cache's tensors, kNN-LM;
- ``server/``: the HTTP API (``chameleon serve``);
- ``bench/``: the harness behind ``chameleon bench``;
- ``cli/``: the command line, a module per group of commands;
- ``cluster.py``, ``models.py``: the local cluster launcher, the built-in models.

Composes :mod:`retriever`, :mod:`coordinator` and :mod:`fpga`; nothing imports this package back.
"""
