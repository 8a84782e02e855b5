"""Which stream each batch comes from: debiased (ZeroVL) or mixed sampling.

Debiased sampling (ZeroVL, arXiv 2112.09331, §3.3): every batch is drawn from one source
dataset, the source chosen with probability proportional to its size. Each worker has one row
stream per source; the source of its k-th batch is drawn with probability proportional to the
rows that source still has *in this worker*. That is sampling batches without replacement: the
sequence of sources is a uniformly random interleaving of the per-source batch sequences, so at
every step the marginal probability of source s is n_s / N (proportional to size) and every
sample is still seen exactly once per epoch.

Mixed sampling: one stream over all sources; a batch holds whatever the shuffled order gives
(sources appear in proportion to their sizes).

The choice for batch k depends only on (seed, epoch, worker, k) and the stream positions, so
it is reproduced exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

_SCHEDULE_SALT = 0xB1A5
MIXED = "*"


class BatchScheduler:
    """Pick the stream of each batch of one worker.

    ``sizes`` maps stream name -> rows owned by this worker; with ``drop_last`` a stream with
    fewer than ``batch_size`` rows left is exhausted (its tail is dropped this epoch).
    """

    def __init__(self, sizes: Mapping[str, int], *, batch_size: int, drop_last: bool,
                 seed_key: tuple[int, ...]) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.names = sorted(sizes)
        self.sizes = np.array([sizes[n] for n in self.names], dtype=np.int64)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.seed_key = tuple(int(x) for x in seed_key)

    def remaining(self, positions: Mapping[str, int]) -> np.ndarray:
        """Rows each stream can still contribute to full (drop_last) or any batches."""
        pos = np.array([positions.get(n, 0) for n in self.names], dtype=np.int64)
        left = np.maximum(self.sizes - pos, 0)
        return np.where(left >= (self.batch_size if self.drop_last else 1), left, 0)

    def choose(self, k: int, positions: Mapping[str, int]) -> str | None:
        """Stream of batch ``k`` (probability ∝ rows left), or ``None`` when all are exhausted."""
        left = self.remaining(positions)
        total = int(left.sum())
        if total == 0:
            return None
        if len(self.names) == 1:
            return self.names[0]
        rng = np.random.default_rng([*self.seed_key, _SCHEDULE_SALT, k])
        return self.names[int(rng.choice(len(self.names), p=left / total))]
