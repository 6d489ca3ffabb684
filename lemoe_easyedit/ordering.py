"""Clustering-based order planning: batches of semantically close edits, one per expert."""

from __future__ import annotations

import math
from typing import List, Optional

import numpy as np
from sklearn.cluster import KMeans


class EditOrderPlanner:
    """Split edits into balanced batches of ``edits_per_expert`` with K-means.

    ``fit(X)`` clusters the edits' routing query vectors with K = number of batches, then
    fills each batch from its own cluster first; edits that do not fit overflow to the
    nearest cluster with room. ``batches_`` lists the edit indices of each batch in the order
    the experts will be trained; ``order_`` is their concatenation.

    With ``enabled=False`` the given order is kept and simply cut into consecutive batches.
    """

    def __init__(self, edits_per_expert: int, seed: int = 0, enabled: bool = True) -> None:
        if not isinstance(edits_per_expert, int) or edits_per_expert < 1:
            raise ValueError(f"edits_per_expert must be an integer >= 1, got {edits_per_expert!r}")
        self.edits_per_expert = edits_per_expert
        self.seed = seed
        self.enabled = enabled
        self.batches_: Optional[List[List[int]]] = None
        self.labels_: Optional[np.ndarray] = None

    def fit(self, X) -> "EditOrderPlanner":
        """Plan batches for the ``[n_edits, dim]`` query matrix ``X``."""
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[0] == 0:
            raise ValueError(f"X must be a non-empty [n_edits, dim] matrix, got shape {X.shape}")
        n, cap = X.shape[0], self.edits_per_expert
        k = math.ceil(n / cap)
        if not self.enabled or k == 1:
            self.labels_ = np.arange(n) // cap
            self.batches_ = [list(range(i, min(i + cap, n))) for i in range(0, n, cap)]
            return self
        km = KMeans(n_clusters=k, n_init=10, random_state=self.seed).fit(X)
        dist = km.transform(X)                      # [n, k] distance to every centre
        sizes = [cap] * (k - 1) + [n - cap * (k - 1)]
        # The smallest batch goes to the smallest cluster, so fewer edits are displaced.
        by_size = np.argsort(np.bincount(km.labels_, minlength=k), kind="stable")
        capacity = np.zeros(k, dtype=int)
        for c, s in zip(by_size, sorted(sizes)):
            capacity[c] = s
        labels = np.full(n, -1)
        # Assign the closest (edit, cluster) pairs first: each edit lands in the nearest
        # cluster that still has room.
        for flat in np.argsort(dist, axis=None, kind="stable"):
            i, c = divmod(int(flat), k)
            if labels[i] < 0 and capacity[c] > 0:
                labels[i] = c
                capacity[c] -= 1
        self.labels_ = labels
        groups = [sorted(np.flatnonzero(labels == c).tolist()) for c in range(k)]
        self.batches_ = sorted((g for g in groups if g), key=lambda g: g[0])
        return self

    @property
    def order_(self) -> List[int]:
        if self.batches_ is None:
            raise RuntimeError("call fit() first")
        return [i for b in self.batches_ for i in b]
