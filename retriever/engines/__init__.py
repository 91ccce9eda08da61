"""Scan engines by name: the CPU engines built in, and hardware engines that register themselves.

Every engine is a :class:`ScanEngine`: ``search(queries, list_ids, k) -> (distances, ids)`` over one
set of inverted lists. Engines for hardware live in packages above this one and announce
themselves in the ``chameleon.scan_engines`` entry-point group (``fpga = "fpga.engine:FpgaEngine"``
in ``pyproject.toml``), the way a PYNQ driver binds to the IP it drives: this package never imports
them, and offers them once they are installed.
"""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from pathlib import Path

from retriever.engines.adc import NumbaEngine
from retriever.engines.base import MAX_K, ScanEngine
from retriever.engines.faiss_ivfpq import FaissEngine, to_faiss_ivfpq
from retriever.engines.fastscan import FastScanEngine
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex

BUILT_IN_ENGINES = {engine.name: engine for engine in (NumbaEngine, FaissEngine, FastScanEngine)}
ENTRY_POINT_GROUP = "chameleon.scan_engines"

__all__ = [
    "BUILT_IN_ENGINES",
    "MAX_K",
    "FaissEngine",
    "FastScanEngine",
    "NumbaEngine",
    "ScanEngine",
    "engine_options",
    "make_scan_engine",
    "scan_engine_class",
    "scan_engine_names",
    "to_faiss_ivfpq",
]


def _registered() -> dict:
    return {entry.name: entry for entry in entry_points(group=ENTRY_POINT_GROUP) if entry.name not in BUILT_IN_ENGINES}


def scan_engine_names() -> tuple[str, ...]:
    """The built-in engines, then the registered ones (without importing them)."""
    return (*BUILT_IN_ENGINES, *sorted(_registered()))


def scan_engine_class(name: str) -> type[ScanEngine]:
    """The engine class called ``name``; a registered one is imported here, on first use."""
    if name in BUILT_IN_ENGINES:
        return BUILT_IN_ENGINES[name]
    entry = _registered().get(name)
    if entry is None:
        raise InvalidInput(f"unknown engine {name!r}; choose from {', '.join(scan_engine_names())}")
    return entry.load()


def engine_options(name: str, fpga_mode: str | None = None, xclbin: str | os.PathLike | None = None) -> dict:
    """The options :func:`make_scan_engine` takes for engine ``name`` from the command line's
    ``--fpga-mode`` and ``--xclbin``, which go with engines on a device only (which need a mode)."""
    engine = scan_engine_class(name)
    if not engine.device_modes:
        if fpga_mode is not None or xclbin is not None:
            device_engines = [other for other in scan_engine_names() if scan_engine_class(other).device_modes]
            raise InvalidInput(f"--fpga-mode and --xclbin go with the {' or '.join(device_engines)} engine")
        return {}
    if fpga_mode is None:
        raise InvalidInput(f"the {name} engine needs --fpga-mode {engine.device_modes_help}")
    return {"mode": fpga_mode, **({"xclbin": str(Path(xclbin).resolve())} if xclbin is not None else {})}


def make_scan_engine(name: str, index: IVFPQIndex, **options) -> ScanEngine:
    """The engine ``name`` over ``index``; ``options`` go to its constructor (``fpga``: mode, xclbin, ...)."""
    engine = scan_engine_class(name)
    if options and not engine.device_modes:
        raise InvalidInput(f"the {name} engine takes no options, got {', '.join(options)}")
    return engine(index, **options)
