"""The host driver for the kernel on an Alveo card, through PYNQ.

``pynq.Overlay(xclbin)`` programs the card; the shard is packed into the bank-striped layout,
allocated with ``pynq.allocate`` in each bank's DDR (the banks the connectivity file of
``hls/Makefile`` wires the ports to), synced to the device once, and every batch then moves only
queries, list ids and results. pynq pins numpy<2, so it lives in the ``fpga`` extra, in an
environment of its own, and is imported only here, when a hardware kernel is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from fpga.config import KernelConfig
from fpga.layout import BankedLists, resident_arrays
from retriever.errors import InvalidInput

KERNEL_NAME = "ivfpq_search_1"
# Results and query buffers are allocated for this many queries; larger batches are split.
MAX_BATCH = 1024


def _import_pynq():
    try:
        import pynq
    except ImportError:
        raise InvalidInput(
            "--fpga-mode hw needs PYNQ (pip install 'chameleon-rag[fpga]' in an environment of its own: pynq pins "
            "numpy<2); --fpga-mode emu runs the same kernel on the CPU"
        ) from None
    return pynq


class PynqKernel:
    """The kernel on the card: :meth:`load` a shard once, :meth:`run` batches of at most :data:`MAX_BATCH`."""

    mode = "hw"
    max_batch = MAX_BATCH

    def __init__(self, xclbin: str | os.PathLike, max_nprobe: int, memories: tuple[str, ...] = ("bank0", "bank1", "bank2", "bank3")):
        xclbin = Path(xclbin)
        if not xclbin.is_file():
            raise InvalidInput(f"no FPGA bitstream at {xclbin} (build it with `make -C hls hw`)")
        self.config = KernelConfig.load(xclbin.with_suffix(".json"))
        pynq = _import_pynq()
        if not pynq.Device.devices:
            raise InvalidInput("PYNQ finds no FPGA device on this host; use --fpga-mode emu to run the kernel on the CPU")
        self._pynq = pynq
        self.overlay = pynq.Overlay(str(xclbin))
        self.ip = getattr(self.overlay, KERNEL_NAME)
        if len(memories) < self.config.banks:
            raise InvalidInput(f"the kernel has {self.config.banks} banks; name that many memories")
        self._banks = [getattr(self.overlay, name) for name in memories[: self.config.banks]]
        self.max_nprobe = max_nprobe
        self._buffers: dict = {}

    def _allocate(self, name: str, array: np.ndarray, bank: int = 0):
        buffer = self._pynq.allocate(array.shape, dtype=array.dtype, target=self._banks[bank])
        buffer[:] = array
        buffer.sync_to_device()
        self._buffers[name] = buffer

    def load(self, banked: BankedLists, centroids: np.ndarray, codebooks: np.ndarray) -> None:
        """Upload the shard once: codes and ids of bank b into memory bank b."""
        arrays = resident_arrays(banked, centroids, codebooks, self.config.banks)
        for buffer in self._buffers.values():
            buffer.freebuffer()
        self._buffers = {}
        for name, (array, bank) in arrays.items():
            self._allocate(name, array, bank)
        self._allocate("queries", np.zeros((MAX_BATCH, self.config.dim), np.float32))
        self._allocate("list_ids", np.zeros((MAX_BATCH, self.max_nprobe), np.int32))
        self._allocate("out_keys", np.zeros((MAX_BATCH, self.config.k), np.float32))
        self._allocate("out_ids", np.zeros((MAX_BATCH, self.config.k), np.int64))

    def run(self, queries: np.ndarray, list_ids: np.ndarray, inner_product: bool) -> tuple[np.ndarray, np.ndarray]:
        """(keys, ids), each (nq, K), for at most :data:`MAX_BATCH` queries of at most ``max_nprobe`` lists."""
        nq, nprobe = list_ids.shape
        if nq > MAX_BATCH or nprobe > self.max_nprobe:
            raise InvalidInput(f"the card takes batches of at most {MAX_BATCH} queries x {self.max_nprobe} lists")
        b = self._buffers
        b["queries"][:nq] = queries
        b["list_ids"][:nq, :nprobe] = list_ids
        b["list_ids"][:nq, nprobe:] = -1  # the buffer's rows are max_nprobe long; the kernel skips -1
        b["queries"].sync_to_device()
        b["list_ids"].sync_to_device()
        scalars = {"nq": nq, "nprobe": self.max_nprobe, "nlist": len(b["list_rows"]) - 1, "inner_product": int(inner_product)}
        self.ip.call(*(scalars[name] if name in scalars else b[name] for name in self.config.port_names()))
        b["out_keys"].sync_from_device()
        b["out_ids"].sync_from_device()
        return np.array(b["out_keys"][:nq]), np.array(b["out_ids"][:nq])
