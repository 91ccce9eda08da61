"""Numba kernels: the ADC scan (8-bit codes), the 4-bit fast scan, exact refinement, and what they share."""
