"""The kernel's memory layout: a shard's inverted lists striped across memory banks.

Vector i of a list goes to bank ``i % banks``; every bank then holds the same number of rows of
that list, rounded up to whole lines of ``lanes`` codes (a line is what one bank delivers per
cycle). Padding rows carry id -1 and are skipped by the kernel. Ids live in arrays of their own,
beside the codes, so that the code stream is dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retriever.errors import InvalidInput
from retriever.index import InvertedLists


@dataclass
class BankedLists:
    """``list_rows`` (nlist + 1,): list l is rows list_rows[l]:list_rows[l+1] of every bank;
    ``codes`` (banks, rows, m) uint8; ``ids`` (banks, rows) int64, -1 for padding."""

    list_rows: np.ndarray
    codes: np.ndarray
    ids: np.ndarray

    @property
    def banks(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return self.list_rows.nbytes + self.codes.nbytes + self.ids.nbytes


def pack_banks(lists: InvertedLists, banks: int, lanes: int) -> BankedLists:
    """Stripe every list of ``lists`` across ``banks`` banks in whole lines of ``lanes`` rows."""
    sizes = lists.list_sizes()
    per_bank_line = banks * lanes
    rows_per_list = -(-sizes // per_bank_line) * lanes  # ceil(size / (banks*lanes)) lines of lanes rows
    list_rows = np.zeros(lists.nlist + 1, dtype=np.int64)
    np.cumsum(rows_per_list, out=list_rows[1:])
    total_rows = int(list_rows[-1])
    m = lists.codes.shape[1]
    codes = np.zeros((banks, total_rows, m), dtype=np.uint8)
    ids = np.full((banks, total_rows), -1, dtype=np.int64)
    # Position of every vector: its list's first row, then i % banks picks the bank, i // banks the row.
    list_of_row = lists.assignment()
    within = np.arange(lists.ntotal) - np.repeat(lists.offsets[:-1], sizes)
    bank = within % banks
    row = list_rows[list_of_row] + within // banks
    codes[bank, row] = lists.codes
    ids[bank, row] = lists.ids
    return BankedLists(list_rows, codes, ids)


def resident_arrays(banked: BankedLists, centroids: np.ndarray, codebooks: np.ndarray, banks: int) -> dict[str, tuple[np.ndarray, int]]:
    """What a kernel with ``banks`` banks keeps in device memory for a shard: port name -> (array,
    the memory bank it goes to). Codes and ids of bank b go to bank b, the rest to bank 0."""
    if banked.banks != banks:
        raise InvalidInput(f"the shard is packed for {banked.banks} banks, the kernel has {banks}")
    arrays = {
        "centroids": (np.ascontiguousarray(centroids, dtype=np.float32), 0),
        "codebooks": (np.ascontiguousarray(codebooks, dtype=np.float32), 0),
        "list_rows": (np.ascontiguousarray(banked.list_rows, dtype=np.int64), 0),
    }
    for b in range(banks):
        arrays[f"codes{b}"] = (np.ascontiguousarray(banked.codes[b]), b)
        arrays[f"ids{b}"] = (np.ascontiguousarray(banked.ids[b]), b)
    return arrays
