"""Chameleon's inference tier and face: CLI, benchmarks harness (LLM engines and the HTTP API come later).

Composes :mod:`retriever`, :mod:`coordinator` and :mod:`fpga`; nothing imports this package back.
"""
