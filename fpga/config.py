"""The kernel's compile-time parameters, and the order of its ports."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from retriever.errors import InvalidInput, NotFound
from retriever.index import IVFPQParams

KSUB = 256  # the kernel scans 8-bit PQ codes
# Each bank delivers one 512-bit AXI beat per cycle, as in Chameleon: 64 // m codes.
BANK_LINE_BYTES = 64
SUPPORTED_BANKS = (1, 2, 4)
DEFAULT_K = 100
DEFAULT_BANKS = 4


@dataclass(frozen=True)
class KernelConfig:
    """What one kernel build is: dimension, sub-quantizers, top-K, PEs over banks, level-1 queue length.

    ``l1 == k`` gives exact results; a smaller level-1 queue saves hardware and can miss a true
    neighbour when more than ``l1`` of the top K fall on one PE (see :func:`fpga.model.miss_probability`).
    """

    dim: int
    m: int
    k: int = DEFAULT_K
    banks: int = DEFAULT_BANKS
    pes: int = DEFAULT_BANKS
    l1: int = DEFAULT_K

    def __post_init__(self):
        for name in ("dim", "m", "k", "banks", "pes", "l1"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InvalidInput(f"FPGA kernel parameter {name} must be a positive integer, got {value!r}")
        if self.dim % self.m:
            raise InvalidInput(f"FPGA kernel: m={self.m} must divide the dimension {self.dim}")
        if self.banks not in SUPPORTED_BANKS:
            raise InvalidInput(f"FPGA kernel: banks must be one of {SUPPORTED_BANKS}, got {self.banks}")
        if self.pes % self.banks:
            raise InvalidInput(f"FPGA kernel: PEs ({self.pes}) must be a multiple of the banks ({self.banks})")
        if self.l1 > self.k:
            raise InvalidInput(f"FPGA kernel: the level-1 queue ({self.l1}) cannot be longer than K ({self.k})")

    @classmethod
    def for_index(cls, params: IVFPQParams, k: int = DEFAULT_K, banks: int = DEFAULT_BANKS, l1: int | None = None) -> KernelConfig:
        """Chameleon's shape for an index: every bank feeds ``64 // m`` PEs per cycle."""
        if params.nbits != 8:
            raise InvalidInput(f"the FPGA kernel scans 8-bit PQ codes; this index has nbits={params.nbits}")
        lanes = max(1, BANK_LINE_BYTES // params.m)
        return cls(params.dim, params.m, k, banks, banks * lanes, k if l1 is None else l1)

    @property
    def lanes(self) -> int:
        """PEs per bank: the codes one bank delivers per cycle."""
        return self.pes // self.banks

    def make_variables(self) -> list[str]:
        """``NAME=value`` for ``make -C hls`` (each becomes ``-DCHAMELEON_NAME=value``)."""
        values = {"D": self.dim, "M": self.m, "K": self.k, "PES": self.pes, "BANKS": self.banks, "L1": self.l1}
        return [f"{name}={value}" for name, value in values.items()]

    def port_names(self) -> list[str]:
        """The kernel's arguments in order (``ivfpq_search`` in hls/ivfpq_kernel.h)."""
        banks = [name for b in range(self.banks) for name in (f"codes{b}", f"ids{b}")]
        return [
            "queries",
            "list_ids",
            "centroids",
            "codebooks",
            "list_rows",
            *banks,
            "nq",
            "nprobe",
            "nlist",
            "inner_product",
            "out_keys",
            "out_ids",
        ]

    def save(self, path: str | os.PathLike) -> None:
        from retriever.files import write_json_atomic

        write_json_atomic(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> KernelConfig:
        try:
            fields = json.loads(Path(path).read_text())
            return cls(**fields)
        except FileNotFoundError:
            raise NotFound(f"{path} is missing: a kernel build writes its parameters there (make -C hls hw)") from None
        except (json.JSONDecodeError, TypeError) as e:
            raise InvalidInput(f"{path} does not describe a kernel build: {e}") from None

    def check_index(self, params: IVFPQParams) -> None:
        """A kernel build serves only indexes of its own shape."""
        if params.nbits != 8:
            raise InvalidInput(f"the FPGA kernel scans 8-bit PQ codes; this index has nbits={params.nbits}")
        if (params.dim, params.m) != (self.dim, self.m):
            raise InvalidInput(f"the kernel was built for dim={self.dim}, m={self.m}; the index has dim={params.dim}, m={params.m}")
