import numpy as np


def same_up_to_ties(d1, i1, d2, i2, rtol=1e-5):
    """Per row: True when two top-k lists agree except for the order (or, at the cut, the choice)
    of candidates whose distances are equal within ``rtol``."""
    rows = []
    for a_d, a_i, b_d, b_i in zip(d1, i1, d2, i2):
        if not np.allclose(a_d, b_d, rtol=rtol, atol=rtol):
            rows.append(False)
            continue
        tied_with_next = np.isclose(a_d[1:], a_d[:-1], rtol=rtol, atol=rtol)
        group_starts = np.flatnonzero(np.concatenate([[True], ~tied_with_next]))
        bounds = list(group_starts) + [len(a_d)]
        ok = all(
            set(a_i[lo:hi]) == set(b_i[lo:hi]) for lo, hi in zip(bounds[:-2], bounds[1:-1])
        )  # the last group may be cut at k differently
        rows.append(ok)
    return np.array(rows)
