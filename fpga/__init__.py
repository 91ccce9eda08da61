"""FPGA retrieval path: the host side of the HLS kernel in ``hls/``.

* :mod:`fpga.config`: a kernel build's parameters (D, m, K, PEs, banks, level-1 queue) and ports;
* :mod:`fpga.layout`: a shard striped across memory banks the way the kernel reads it;
* :mod:`fpga.pynq_driver`: the kernel on an Alveo card through PYNQ (``--fpga-mode hw``);
* :mod:`fpga.emulation`: the same kernel sources built for the CPU, driven through ctypes
  (``--fpga-mode emu``);
* :mod:`fpga.engine`: ``--engine fpga``, a scan engine over either;
* :mod:`fpga.model`: cycles per query from the kernel's structure, and the level-1 miss model;
* :mod:`fpga.golden`: golden data for ``make -C hls csim``.

pynq is imported lazily and lives in the ``fpga`` extra (it pins numpy<2).
"""
