"""Streaming item-frequency estimation (Yi et al., "Sampling-Bias-Corrected
Neural Modeling for Large Corpus Item Recommendations", RecSys 2019).

Each of ``hashes`` arrays of ``buckets`` cells keeps, per hashed item:

- ``A``: the step at which the item was last seen;
- ``B``: an exponential moving average of the gap between sightings,
  ``B <- (1 - alpha) * B + alpha * (t - A)``, then ``A <- t``.

The estimated probability of the item at each step is ``1 / B``; with
several hash arrays the estimate takes the largest gap (collisions only
shorten gaps). A step is one occurrence of any item, so ``1 / B`` estimates
an item's share of the stream (its click share, fed with clicks).

Two additions to the paper, documented here:

- A cell's first sighting only starts its clock (``A <- t``): there is no
  gap before it. The paper's rule would take ``t - 0``, the steps since the
  stream began, as the first gap, and an item first seen late in the stream
  would stay estimated far too rare for hundreds of sightings (an item of
  share 0.01 first seen at step 800,000: 48x too low after 100 sightings).
  Until its second sighting an item has no estimate (probability 0).
- ``B`` starts at 0, so for its first ~1/alpha gaps the moving average
  under-estimates the gap. As in Adam, the estimate is debiased by
  ``1 - (1 - alpha) ** n`` (n = gaps seen in that cell: sightings - 1),
  which makes early estimates usable.

``resolution`` is the smallest share the arrays can tell apart (see there);
the trainers use it as the floor of sampling probabilities.

Pure numpy: no clocks, files or Kafka; the step counter is the only time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from freshtower.core.fingerprints import fingerprint_strings

# Multiply-shift hashing, one (odd multiplier, offset) pair per array.
_HASH_A = (0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0x27D4EB2F165667C5)
_HASH_B = (0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F, 0x165667B1)


class FrequencyEstimator:
    """Hashed last-seen / gap arrays with the paper's update rule.

    >>> est = FrequencyEstimator(buckets=1024, hashes=2, alpha=0.5)
    >>> est.update(["a", "b"] * 50)  # "a" every 2nd step
    >>> round(float(est.probability(["a"])[0]), 3)
    0.5
    """

    def __init__(self, buckets: int = 1 << 20, hashes: int = 2, alpha: float = 0.01):
        if not 1 <= hashes <= len(_HASH_A):
            raise ValueError(f"hashes must be in 1..{len(_HASH_A)}, got {hashes}")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.buckets = int(buckets)
        self.hashes = int(hashes)
        self.alpha = float(alpha)
        self.step = 0  # occurrences seen so far; the next one is step + 1
        self.last_step = np.zeros((hashes, buckets), dtype=np.int64)  # A
        self.gap = np.zeros((hashes, buckets), dtype=np.float64)  # B
        self.sightings = np.zeros((hashes, buckets), dtype=np.int64)  # n, for debiasing
        # Flat indices (row * buckets + column) of the cells seen so far, sorted,
        # kept by ``update`` so that ``touched_cells`` need not scan the arrays
        # (2 x 2^20 cells: ~25 ms a scan, once per batch file in the streams
        # worker). None: unknown (the arrays were set from outside), found by a scan.
        self._touched: np.ndarray | None = np.zeros(0, dtype=np.int64)

    def _buckets(self, fingerprints: np.ndarray) -> np.ndarray:
        """(hashes, n) bucket of each 64-bit ID fingerprint
        (``freshtower.core.fingerprints``) in each array."""
        rows = []
        fingerprints = np.asarray(fingerprints, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for h in range(self.hashes):
                # uint64 multiplication wraps around, which is what mixes the bits.
                mixed = ((fingerprints + np.uint64(_HASH_B[h])) * np.uint64(_HASH_A[h])) >> np.uint64(29)
                rows.append((mixed % np.uint64(self.buckets)).astype(np.int64))
        return np.stack(rows)

    def update(self, item_ids: Sequence[str], fingerprints: np.ndarray | None = None) -> None:
        """Record one occurrence per entry, in order (steps step+1 .. step+n).

        Exactly the paper's sequential rule, vectorised: repeated buckets
        within one call are folded with the closed form of the moving average.
        """
        n = len(item_ids) if fingerprints is None else len(fingerprints)
        if n == 0:
            return
        if fingerprints is None:
            fingerprints = fingerprint_strings(item_ids)
        steps = np.arange(self.step + 1, self.step + n + 1, dtype=np.int64)
        keep = 1.0 - self.alpha
        fresh = []  # flat indices of cells seen for the first time
        for h, bucket in enumerate(self._buckets(fingerprints)):
            order = np.argsort(bucket, kind="stable")  # stable: steps stay increasing per bucket
            b = bucket[order]
            t = steps[order]
            first = np.empty(n, dtype=bool)
            first[0] = True
            np.not_equal(b[1:], b[:-1], out=first[1:])
            starts = np.flatnonzero(first)
            sizes = np.diff(np.append(starts, n))
            group = np.cumsum(first) - 1
            previous = np.where(first, self.last_step[h, b], np.concatenate(([0], t[:-1])))
            gaps = (t - previous).astype(np.float64)
            # A cell never seen before has no gap at its first occurrence:
            # that occurrence only starts the clock.
            gaps[first & (self.sightings[h, b] == 0)] = 0.0
            rank = np.arange(n) - starts[group]  # 0 for a bucket's first occurrence
            weights = keep ** (sizes[group] - 1 - rank)
            contribution = np.bincount(group, weights=self.alpha * weights * gaps, minlength=len(starts))
            cells = b[starts]
            fresh.append(cells[self.sightings[h, cells] == 0] + h * self.buckets)
            # A fresh cell's gap is 0, so its extra decay step is harmless.
            self.gap[h, cells] = keep ** sizes * self.gap[h, cells] + contribution
            self.last_step[h, cells] = t[starts + sizes - 1]
            self.sightings[h, cells] += sizes
        if self._touched is not None:
            new = np.sort(np.concatenate(fresh))  # distinct: unique cells per row, rows offset apart
            if len(new):  # merged into the sorted list: no re-sort of what was touched before
                self._touched = np.insert(self._touched, np.searchsorted(self._touched, new), new)
        self.step += n

    def touched_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, columns) of the cells seen at least once, in row-major
        order: ``np.nonzero(self.sightings)`` without scanning the arrays.

        >>> est = FrequencyEstimator(buckets=8, hashes=2)
        >>> est.update(["a", "b", "a"])
        >>> all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(est.touched_cells(), np.nonzero(est.sightings)))
        True
        """
        if self._touched is None:
            self._touched = np.flatnonzero(self.sightings)
        rows, columns = np.divmod(self._touched, self.buckets)
        return rows, columns

    def arrays_changed(self) -> None:
        """Call after writing ``last_step``, ``gap`` or ``sightings`` directly
        (not through ``update``): the next ``touched_cells`` scans them."""
        self._touched = None

    def expected_gap(self, item_ids: Sequence[str] | None = None, fingerprints: np.ndarray | None = None) -> np.ndarray:
        """Debiased gap estimate per item (steps); 0 where there is none yet.

        An item has none if any of its cells has seen fewer than two
        occurrences, i.e. no gap (collisions can only fill cells, never
        empty them), as in a count-min sketch."""
        if fingerprints is None:
            fingerprints = fingerprint_strings(item_ids or [])
        buckets = self._buckets(fingerprints)
        rows = np.arange(self.hashes)[:, None]
        gap = self.gap[rows, buckets]
        gaps_seen = self.sightings[rows, buckets] - 1  # the first sighting has no gap
        with np.errstate(divide="ignore", invalid="ignore"):
            debiased = np.where(gaps_seen > 0, gap / (1.0 - (1.0 - self.alpha) ** gaps_seen), 0.0)
        return np.where((gaps_seen > 0).all(axis=0), debiased.max(axis=0), 0.0)

    def probability(self, item_ids: Sequence[str] | None = None, fingerprints: np.ndarray | None = None) -> np.ndarray:
        """Estimated share of the stream per item, ``1 / gap``; 0 where there
        is no estimate yet (never seen, or seen once)."""
        gap = self.expected_gap(item_ids, fingerprints)
        with np.errstate(divide="ignore"):
            return np.where(gap > 0, 1.0 / np.maximum(gap, 1.0), 0.0)

    @property
    def resolution(self) -> float:
        """The smallest share the estimator can tell apart, ``1 / min(step, buckets)``.

        Two limits: a gap longer than the stream so far cannot be measured
        (shares below ``1 / step``), and each array spreads the whole stream
        over ``buckets`` cells, so an item's cell also carries the traffic of
        the items hashed with it, on average ``1 / buckets`` of the stream:
        rarer items all read about that. Trainers floor sampling
        probabilities here; more buckets resolve a longer tail.

        >>> FrequencyEstimator(buckets=1024).resolution  # nothing seen yet
        1.0
        >>> est = FrequencyEstimator(buckets=1024)
        >>> est.update([f"i{k % 300}" for k in range(5000)])
        >>> est.resolution == 1 / 1024
        True
        """
        return 1.0 / max(1, min(self.step, self.buckets))

    # --- persistence ---------------------------------------------------------

    def state_dict(self) -> dict[str, np.ndarray]:
        return {
            "config": np.asarray([self.buckets, self.hashes], dtype=np.int64),
            "alpha": np.asarray([self.alpha], dtype=np.float64),
            "step": np.asarray([self.step], dtype=np.int64),
            "last_step": self.last_step,
            "gap": self.gap,
            "sightings": self.sightings,
        }

    @classmethod
    def from_state_dict(cls, state) -> "FrequencyEstimator":
        buckets, hashes = (int(v) for v in np.asarray(state["config"]))
        estimator = cls(buckets=buckets, hashes=hashes, alpha=float(np.asarray(state["alpha"])[0]))
        estimator.step = int(np.asarray(state["step"])[0])
        for name in ("last_step", "gap", "sightings"):
            value = np.asarray(state[name])
            if value.shape != (hashes, buckets):
                raise ValueError(f"frequency state {name!r} has shape {value.shape}, expected {(hashes, buckets)}")
            setattr(estimator, name, value.astype(getattr(estimator, name).dtype, copy=True))
        estimator.arrays_changed()
        return estimator

    def save(self, path) -> None:
        """Write the state as an ``.npz`` file (the caller makes it atomic)."""
        np.savez(path, **self.state_dict())

    @classmethod
    def load(cls, path) -> "FrequencyEstimator":
        with np.load(path, allow_pickle=False) as data:
            return cls.from_state_dict({k: data[k] for k in data.files})
