"""Bucketed batch sampling that is identical for any split of a global batch over ranks.

Every batch must hold images of one bucket (one tensor shape). The batcher decides
*global* batches of ``batch_size * world_size`` indices, each from a single bucket, and
rank ``r`` takes slice ``r`` of every global batch. Consequences:

* every rank runs exactly ``len(batcher)`` steps per epoch, so no rank waits forever in
  a collective at the end of an epoch;
* the ranks' shards are disjoint, and the union of the ranks' step-k batches is the
  step-k batch of a single process with the same global batch size, so a 2-rank run and
  a 1-process run see the same data in the same order;
* the samples of a bucket that do not fill a global batch are dropped for that epoch.
  Their number is logged at construction and kept in ``num_dropped``; with shuffling a
  different subset is dropped each epoch.

Shuffling depends only on (seed, epoch), so an epoch's order can be rebuilt anywhere:
resume with ``batches(epoch, start_step)``, taking the position from the number of
optimizer steps done (:meth:`BucketBatcher.position`).
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

logger = logging.getLogger(__name__)


class BucketBatcher:
    """Per-rank batches of dataset indices, each batch from one bucket.

    Args:
        bucket_keys: bucket key of every dataset index (``dataset.bucket_keys``).
        batch_size: samples per rank per step.
        world_size: number of ranks sharing a global batch.
        rank: this process's rank, in [0, world_size).
        seed: shuffling seed; the same on every rank.
        shuffle: shuffle within buckets and the order of batches; off gives bucket by
            bucket in index order (for debugging).
    """

    def __init__(self, bucket_keys: Sequence[str], batch_size: int, world_size: int = 1,
                 rank: int = 0, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or world_size < 1:
            raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size} and {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.global_batch_size = batch_size * world_size

        members: Dict[str, List[int]] = defaultdict(list)
        for index, key in enumerate(bucket_keys):
            members[key].append(index)
        # Sorted so the bucket order (and thus the RNG stream) never depends on dataset order.
        self._buckets = {key: np.asarray(members[key], dtype=np.int64)
                         for key in sorted(members, key=float)}
        g = self.global_batch_size
        self.num_samples = len(bucket_keys)
        self.steps_per_epoch = sum(len(m) // g for m in self._buckets.values())
        self.dropped_per_bucket = {k: len(m) % g for k, m in self._buckets.items() if len(m) % g}
        self.num_dropped = sum(self.dropped_per_bucket.values())
        if self.steps_per_epoch == 0:
            sizes = ", ".join(f"{k}: {len(m)}" for k, m in self._buckets.items())
            raise ValueError(
                f"no bucket holds a full global batch of {g} (= batch {batch_size} x {world_size} ranks); "
                f"images per bucket: {sizes or 'none'}. Lower the batch size or add images.")
        self._report()

    def _report(self) -> None:
        g = self.global_batch_size
        if not self.num_dropped:
            logger.info("bucket batcher: %d samples in %d buckets, %d steps per epoch, none dropped",
                        self.num_samples, len(self._buckets), self.steps_per_epoch)
            return
        detail = ", ".join(f"{k}: {d} of {len(self._buckets[k])}" for k, d in self.dropped_per_bucket.items())
        logger.warning(
            "bucket batcher: %d of %d samples are dropped each epoch because their bucket does not "
            "fill a last global batch of %d (%s); %s. %d steps per epoch.",
            self.num_dropped, self.num_samples, g, detail,
            "a different subset each epoch" if self.shuffle else "always the same ones (shuffle is off)",
            self.steps_per_epoch)

    def __len__(self) -> int:
        """Steps per epoch, the same on every rank."""
        return self.steps_per_epoch

    def global_batches(self, epoch: int) -> List[np.ndarray]:
        """The epoch's global batches in order, each (global_batch_size,) indices of one bucket."""
        rng = np.random.default_rng([self.seed, epoch])
        g = self.global_batch_size
        batches = []
        for members in self._buckets.values():
            order = rng.permutation(members) if self.shuffle else members
            usable = len(order) - len(order) % g
            batches.extend(order[:usable].reshape(-1, g))
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[List[int]]:
        """This rank's batches of ``epoch`` from step ``start_step`` on: lists of batch_size indices."""
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        for batch in self.global_batches(epoch)[start_step:]:
            yield batch[lo:hi].tolist()

    def position(self, steps_done: int) -> Tuple[int, int]:
        """(epoch, step within it) at which to resume after ``steps_done`` steps in all."""
        if steps_done < 0:
            raise ValueError(f"steps_done must be >= 0, got {steps_done}")
        return divmod(steps_done, self.steps_per_epoch)
