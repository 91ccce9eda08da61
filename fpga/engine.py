"""``--engine fpga``: a scan engine whose scans run on the HLS kernel, on the card or emulated."""

from __future__ import annotations

import os

import numpy as np

from fpga.config import DEFAULT_BANKS, DEFAULT_K, KernelConfig
from fpga.layout import pack_banks
from retriever.engines import ScanEngine
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex

FPGA_MODES = ("emu", "hw")
# The card's list-id buffer is allocated for this many probes per query (or nlist, if smaller).
HW_MAX_NPROBE = 1024


class FpgaEngine(ScanEngine):
    """The shard packed into the kernel's bank-striped layout, uploaded once, searched in batches.

    ``mode="hw"`` drives the kernel built into ``xclbin`` through PYNQ (its parameters are read
    from the ``.json`` beside it); ``mode="emu"`` builds the same kernel sources for this CPU with
    Chameleon's shape for the index (:meth:`KernelConfig.for_index`: ``k`` results, ``banks``
    banks, level-1 queues of ``l1``, exact when ``l1`` is ``k``).
    """

    name = "fpga"
    device_modes = FPGA_MODES
    device_modes_help = "hw (an Alveo card through PYNQ) or emu (the kernel on this CPU)"

    def __init__(
        self,
        index: IVFPQIndex,
        mode: str = "emu",
        xclbin: str | os.PathLike | None = None,
        k: int = DEFAULT_K,
        banks: int = DEFAULT_BANKS,
        l1: int | None = None,
    ):
        super().__init__(index)
        if mode == "emu":
            from fpga.emulation import EmulatedKernel

            if xclbin is not None:
                raise InvalidInput("--xclbin is for --fpga-mode hw; the emulation builds the kernel from hls/")
            self.kernel = EmulatedKernel(KernelConfig.for_index(index.params, k=k, banks=banks, l1=l1))
        elif mode == "hw":
            from fpga.pynq_driver import PynqKernel

            if xclbin is None:
                raise InvalidInput("--fpga-mode hw needs --xclbin (the bitstream `make -C hls hw` builds)")
            self.kernel = PynqKernel(xclbin, max_nprobe=min(index.params.nlist, HW_MAX_NPROBE))
        else:
            raise InvalidInput(f"unknown FPGA mode {mode!r}; choose from {', '.join(FPGA_MODES)}")
        self.config = self.kernel.config
        self.config.check_index(index.params)
        self.kernel.load(pack_banks(self.lists, self.config.banks, self.config.lanes), self.centroids, self.codebooks)

    def search_checked(self, queries, list_ids, k):
        if k > self.config.k:
            raise InvalidInput(f"the FPGA kernel was built for at most K={self.config.k} results, asked for k={k}")
        batch = getattr(self.kernel, "max_batch", None) or max(1, len(queries))
        keys = np.empty((len(queries), k), np.float32)
        ids = np.empty((len(queries), k), np.int64)
        for start in range(0, len(queries), batch):
            rows = slice(start, start + batch)
            batch_keys, batch_ids = self.kernel.run(queries[rows], list_ids[rows], self.params.inner_product)
            keys[rows], ids[rows] = batch_keys[:, :k], batch_ids[:, :k]
        return (-keys if self.params.inner_product else keys), ids
