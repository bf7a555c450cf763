"""The sample schema of a training batch: one ``Sample`` per record, the
columns a reader decodes (``SampleColumns``), and the features a model
declares (``FeatureSpec``). See the package docstring for the record keys.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from freshtower.core.fingerprints import fingerprint_strings

FORMAT_VERSION = 1




class BatchFormatError(ValueError):
    """A batch file or manifest that cannot be trusted, with where it broke."""

    def __init__(self, path: Path | str, offset: int | None, reason: str):
        where = f"{path}" if offset is None else f"{path}, byte offset {offset}"
        super().__init__(f"{where}: {reason}")
        self.path = Path(path)
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Sample:
    """One training sample: a (user, item) pair that was shown, and maybe clicked."""

    user_id: str
    item_id: str
    label: int  # 1 clicked, 0 shown but not clicked
    event_time_ms: int
    request_id: str
    position: int
    user_categorical: Mapping[str, str] = field(default_factory=dict)
    user_numeric: Mapping[str, float] = field(default_factory=dict)
    item_categorical: Mapping[str, str] = field(default_factory=dict)
    hard_negative_ids: tuple[str, ...] = ()
    teacher_score: float | None = None


@dataclass(frozen=True)
class FeatureSpec:
    """Which side features the reader extracts, in column order."""

    user_categorical: tuple[str, ...] = ()
    user_numeric: tuple[str, ...] = ()
    item_categorical: tuple[str, ...] = ()

    @classmethod
    def from_model(cls, model_config) -> "FeatureSpec":
        return cls(
            tuple(model_config.user_categorical),
            tuple(model_config.user_numeric),
            tuple(model_config.item_categorical),
        )


@dataclass
class SampleColumns:
    """Decoded samples, column by column (N samples).

    Hard negatives are ragged: row i's are
    ``hard_negative_flat[hard_negative_offsets[i]:hard_negative_offsets[i + 1]]``.
    64-bit fingerprints of the IDs (``freshtower.core.fingerprints``), which the
    trainers' lookups use, are computed on first use and kept.
    """

    user_ids: list[str]
    item_ids: list[str]
    labels: np.ndarray  # (N,) int8
    event_time_ms: np.ndarray  # (N,) int64, ms since epoch
    request_ids: list[str]
    positions: np.ndarray  # (N,) int32
    user_categorical: dict[str, list[str]]  # name -> N values ("" unknown)
    user_numeric: np.ndarray  # (N, F) float32, FeatureSpec.user_numeric order
    item_categorical: dict[str, list[str]]
    hard_negative_flat: list[str]  # every row's hard negatives, row after row
    hard_negative_offsets: np.ndarray  # (N + 1,) int64
    teacher_scores: np.ndarray  # (N,) float32, NaN where absent
    user_fingerprints: np.ndarray | None = None  # (N,) uint64
    item_fingerprints: np.ndarray | None = None  # (N,) uint64
    hard_negative_fingerprints: np.ndarray | None = None  # (len(flat),) uint64
    user_categorical_fingerprints: dict[str, np.ndarray] | None = None  # name -> (N,) uint64

    def __len__(self) -> int:
        return len(self.user_ids)

    @property
    def hard_negative_ids(self) -> list[tuple[str, ...]]:
        """Row by row, as tuples (convenient, not for hot paths)."""
        bounds = self.hard_negative_offsets.tolist()
        return [tuple(self.hard_negative_flat[bounds[i] : bounds[i + 1]]) for i in range(len(self))]

    def user_id_fingerprints(self) -> np.ndarray:
        if self.user_fingerprints is None:
            self.user_fingerprints = fingerprint_strings(self.user_ids)
        return self.user_fingerprints

    def item_id_fingerprints(self) -> np.ndarray:
        if self.item_fingerprints is None:
            self.item_fingerprints = fingerprint_strings(self.item_ids)
        return self.item_fingerprints

    def hard_negative_id_fingerprints(self) -> np.ndarray:
        if self.hard_negative_fingerprints is None:
            self.hard_negative_fingerprints = fingerprint_strings(self.hard_negative_flat)
        return self.hard_negative_fingerprints

    # Pickling (the online trainer's decode process hands batches over): a
    # column of N strings joined on NUL pickles ~10x faster than N objects.
    _STRING_COLUMNS = ("user_ids", "item_ids", "request_ids", "hard_negative_flat")

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        for name in self._STRING_COLUMNS:
            state[name] = _pack_strings(state[name])
        for name in ("user_categorical", "item_categorical"):
            state[name] = {k: _pack_strings(v) for k, v in state[name].items()}
        return state

    def __setstate__(self, state: dict) -> None:
        for name in self._STRING_COLUMNS:
            state[name] = _unpack_strings(state[name])
        for name in ("user_categorical", "item_categorical"):
            state[name] = {k: _unpack_strings(v) for k, v in state[name].items()}
        self.__dict__.update(state)

    def user_categorical_value_fingerprints(self) -> dict[str, np.ndarray]:
        """Fingerprints of the user categorical values, by feature name."""
        if self.user_categorical_fingerprints is None:
            self.user_categorical_fingerprints = {k: fingerprint_strings(v) for k, v in self.user_categorical.items()}
        return self.user_categorical_fingerprints

    def take(self, indices: Sequence[int] | np.ndarray) -> "SampleColumns":
        """The samples at ``indices``, in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        pick = idx.tolist()
        starts = self.hard_negative_offsets[idx]
        counts = self.hard_negative_offsets[idx + 1] - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        flat = np.repeat(starts - offsets[:-1], counts) + np.arange(offsets[-1])  # source position of each
        fingerprints = lambda column: None if column is None else column[idx]  # noqa: E731
        return SampleColumns(
            user_ids=[self.user_ids[i] for i in pick],
            item_ids=[self.item_ids[i] for i in pick],
            labels=self.labels[idx],
            event_time_ms=self.event_time_ms[idx],
            request_ids=[self.request_ids[i] for i in pick],
            positions=self.positions[idx],
            user_categorical={k: [v[i] for i in pick] for k, v in self.user_categorical.items()},
            user_numeric=self.user_numeric[idx],
            item_categorical={k: [v[i] for i in pick] for k, v in self.item_categorical.items()},
            hard_negative_flat=[self.hard_negative_flat[i] for i in flat.tolist()],
            hard_negative_offsets=offsets,
            teacher_scores=self.teacher_scores[idx],
            user_fingerprints=fingerprints(self.user_fingerprints),
            item_fingerprints=fingerprints(self.item_fingerprints),
            hard_negative_fingerprints=None if self.hard_negative_fingerprints is None else self.hard_negative_fingerprints[flat],
            user_categorical_fingerprints=_each(self.user_categorical_fingerprints, idx),
        )

    def span(self, start: int, stop: int) -> "SampleColumns":
        """Samples ``start:stop`` (what ``take(range(start, stop))`` gives, by
        slicing: the trainers cut every file into minibatches this way)."""
        stop = min(stop, len(self))
        first, last = int(self.hard_negative_offsets[start]), int(self.hard_negative_offsets[stop])
        window = slice(start, stop)
        fingerprints = lambda column: None if column is None else column[window]  # noqa: E731
        return SampleColumns(
            user_ids=self.user_ids[window],
            item_ids=self.item_ids[window],
            labels=self.labels[window],
            event_time_ms=self.event_time_ms[window],
            request_ids=self.request_ids[window],
            positions=self.positions[window],
            user_categorical={k: v[window] for k, v in self.user_categorical.items()},
            user_numeric=self.user_numeric[window],
            item_categorical={k: v[window] for k, v in self.item_categorical.items()},
            hard_negative_flat=self.hard_negative_flat[first:last],
            hard_negative_offsets=self.hard_negative_offsets[start : stop + 1] - first,
            teacher_scores=self.teacher_scores[window],
            user_fingerprints=fingerprints(self.user_fingerprints),
            item_fingerprints=fingerprints(self.item_fingerprints),
            hard_negative_fingerprints=None if self.hard_negative_fingerprints is None else self.hard_negative_fingerprints[first:last],
            user_categorical_fingerprints=_each(self.user_categorical_fingerprints, window),
        )

    @staticmethod
    def concat(parts: Sequence["SampleColumns"], spec: FeatureSpec) -> "SampleColumns":
        if not parts:
            return empty_columns(spec)
        if len(parts) == 1:
            return parts[0]
        offsets = [np.zeros(1, np.int64)]
        shift = 0
        for p in parts:
            offsets.append(p.hard_negative_offsets[1:] + shift)
            shift += int(p.hard_negative_offsets[-1])

        def joined(name: str):
            columns = [getattr(p, name) for p in parts]
            return None if any(c is None for c in columns) else np.concatenate(columns)

        return SampleColumns(
            user_ids=[u for p in parts for u in p.user_ids],
            item_ids=[u for p in parts for u in p.item_ids],
            labels=np.concatenate([p.labels for p in parts]),
            event_time_ms=np.concatenate([p.event_time_ms for p in parts]),
            request_ids=[u for p in parts for u in p.request_ids],
            positions=np.concatenate([p.positions for p in parts]),
            user_categorical={k: [v for p in parts for v in p.user_categorical[k]] for k in spec.user_categorical},
            user_numeric=np.concatenate([p.user_numeric for p in parts]),
            item_categorical={k: [v for p in parts for v in p.item_categorical[k]] for k in spec.item_categorical},
            hard_negative_flat=[h for p in parts for h in p.hard_negative_flat],
            hard_negative_offsets=np.concatenate(offsets),
            teacher_scores=np.concatenate([p.teacher_scores for p in parts]),
            user_fingerprints=joined("user_fingerprints"),
            item_fingerprints=joined("item_fingerprints"),
            hard_negative_fingerprints=joined("hard_negative_fingerprints"),
            user_categorical_fingerprints=None
            if any(p.user_categorical_fingerprints is None for p in parts)
            else {k: np.concatenate([p.user_categorical_fingerprints[k] for p in parts]) for k in spec.user_categorical},
        )


def _pack_strings(values: list[str]):
    """``(count, values joined on NUL)``, or the list itself if a value holds a NUL."""
    joined = "\x00".join(values)
    if values and joined.count("\x00") != len(values) - 1:
        return list(values)
    return (len(values), joined)


def _unpack_strings(packed) -> list[str]:
    if isinstance(packed, list):
        return packed
    count, joined = packed
    return joined.split("\x00") if count else []


def _each(columns: dict[str, np.ndarray] | None, index) -> dict[str, np.ndarray] | None:
    return None if columns is None else {k: v[index] for k, v in columns.items()}


def empty_columns(spec: FeatureSpec) -> SampleColumns:
    return SampleColumns(
        user_ids=[],
        item_ids=[],
        labels=np.zeros(0, np.int8),
        event_time_ms=np.zeros(0, np.int64),
        request_ids=[],
        positions=np.zeros(0, np.int32),
        user_categorical={k: [] for k in spec.user_categorical},
        user_numeric=np.zeros((0, len(spec.user_numeric)), np.float32),
        item_categorical={k: [] for k in spec.item_categorical},
        hard_negative_flat=[],
        hard_negative_offsets=np.zeros(1, np.int64),
        teacher_scores=np.zeros(0, np.float32),
    )


