"""FPGA retrieval path: PYNQ host driver for the HLS kernel in ``hls/`` and its emulation backend.
pynq is imported lazily and lives in the ``fpga`` extra (it pins numpy<2).
"""
