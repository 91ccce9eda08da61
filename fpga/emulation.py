"""The emulation backend: the HLS kernel's own C++ built for this CPU and called through ctypes.

It takes the buffers the PYNQ driver would upload (the bank-striped layout of
:mod:`fpga.layout`) and runs the very code that is synthesised, so everything above the kernel
(packing, batching, validation, the node) is tested on any machine with a C++ compiler. Builds
are cached per kernel configuration and source version under ``$CHAMELEON_CACHE/fpga-emu``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from fpga.config import KernelConfig
from fpga.layout import BankedLists, resident_arrays
from retriever.datasets import cache_dir
from retriever.errors import InvalidInput, NotFound

HLS_DIR = Path(__file__).resolve().parent.parent / "hls"
KERNEL_FILES = ("ivfpq_kernel.cpp", "ivfpq_kernel.h", "hls_shim.h", "Makefile")


def build_library(config: KernelConfig) -> Path:
    """The kernel compiled as a shared library for ``config`` (``make -C hls emu-lib``), built once."""
    if not HLS_DIR.is_dir():
        raise NotFound(f"the kernel sources are missing ({HLS_DIR}): the FPGA emulation runs from a source checkout")
    for tool in ("make", os.environ.get("CXX", "g++")):
        if shutil.which(tool) is None:
            raise InvalidInput(f"the FPGA emulation builds the kernel with make and a C++ compiler; {tool!r} is not on PATH")
    make_variables = config.make_variables()
    digest = hashlib.sha256(" ".join(make_variables).encode())
    for name in KERNEL_FILES:
        digest.update((HLS_DIR / name).read_bytes())
    library = cache_dir() / "fpga-emu" / f"ivfpq-{digest.hexdigest()[:16]}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".ivfpq-", suffix=".so", dir=library.parent)
    os.close(fd)
    try:
        result = subprocess.run(
            ["make", "-s", "-C", str(HLS_DIR), "emu-lib", f"EMU_LIB={partial}", *make_variables], capture_output=True, text=True
        )
        if result.returncode != 0:
            raise InvalidInput(f"building the FPGA kernel for emulation failed:\n{result.stdout}{result.stderr}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


_ARGTYPES = {
    "queries": np.float32,
    "list_ids": np.int32,
    "centroids": np.float32,
    "codebooks": np.float32,
    "list_rows": np.int64,
    "out_keys": np.float32,
    "out_ids": np.int64,
}
_SCALARS = ("nq", "nprobe", "nlist", "inner_product")


def _port_type(name: str):
    if name in _SCALARS:
        return ctypes.c_int32
    return ctypes.c_void_p  # buffers; their dtypes are checked in :meth:`EmulatedKernel.run`


class EmulatedKernel:
    """Same interface as :class:`fpga.pynq_driver.PynqKernel`: :meth:`load` a shard once, :meth:`run` batches."""

    mode = "emu"

    def __init__(self, config: KernelConfig):
        self.config = config
        self._function = ctypes.CDLL(str(build_library(config))).ivfpq_search  # CDLL calls release the GIL
        self._function.restype = None
        self._function.argtypes = [_port_type(name) for name in config.port_names()]
        self._resident: dict[str, np.ndarray] = {}

    def load(self, banked: BankedLists, centroids: np.ndarray, codebooks: np.ndarray) -> None:
        """Keep the shard's arrays where the kernel reads them (device memory, on hardware)."""
        arrays = resident_arrays(banked, centroids, codebooks, self.config.banks)
        self._resident = {name: array for name, (array, _) in arrays.items()}

    def run(self, queries: np.ndarray, list_ids: np.ndarray, inner_product: bool) -> tuple[np.ndarray, np.ndarray]:
        """(keys, ids), each (nq, K): keys ascending (negated inner products), id -1 past the candidates."""
        if not self._resident:
            raise InvalidInput("no shard is loaded on the kernel")
        nq, nprobe = list_ids.shape
        buffers = dict(self._resident)
        buffers["queries"] = np.ascontiguousarray(queries, dtype=np.float32)
        buffers["list_ids"] = np.ascontiguousarray(list_ids, dtype=np.int32)
        buffers["out_keys"] = np.empty((nq, self.config.k), dtype=np.float32)
        buffers["out_ids"] = np.empty((nq, self.config.k), dtype=np.int64)
        scalars = {"nq": nq, "nprobe": nprobe, "nlist": len(buffers["list_rows"]) - 1, "inner_product": int(inner_product)}
        arguments = []
        for name in self.config.port_names():
            if name in scalars:
                arguments.append(scalars[name])
            else:
                array = buffers[name]
                expected = _ARGTYPES.get(name, np.uint8 if name.startswith("codes") else np.int64)
                assert array.dtype == expected and array.flags.c_contiguous, name
                arguments.append(array.ctypes.data)
        self._function(*arguments)
        return buffers["out_keys"], buffers["out_ids"]
