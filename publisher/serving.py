"""What the recall service serves: one immutable ``ServingState`` per
active release, and the recall computation over it.

A state is a full release (user tower, ID table, item IDs, Faiss index)
with the chain of embeddings releases after it applied on top. The
service swaps the whole object when the active release changes; a request
reads the reference once, so it never sees half of a swap. The arrays are
marked read-only: a state is never changed after it is built.

An embeddings release may also carry the vectors of items born since
the full release: they are served from a second, small index beside the
full release's (``publisher/new_item_index.py``), rebuilt from each
release's file while the state is built, and a search merges the two by
cosine. The full release's index is shared by every state of its chain
and never changed.

Loading checks every file against its manifest's SHA-256 first
(``ReleaseStore.verify``); a release that fails is refused and the current
state stays. Moving to a child of the current release (the usual case, a
new embeddings release) applies only that release's rows to a copy;
anything else (a rollback, a restart) loads the chain from its full
release.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from freshtower.publisher.prerank_serving import PrerankState, load_prerank, with_statistics, with_user_rows
from freshtower.publisher.new_item_index import NewItemIndex, merge_top_k
from freshtower.publisher.releases import Release, ReleaseError, ReleaseStore
from freshtower.publisher.user_tower import ServingUserTower
from freshtower.trainer.retrieval import FaissRetriever, IndexSettings

from freshtower.core.contracts import FullReleaseManifest

from freshtower.core.settings import PrerankConfig


@dataclass(frozen=True)
class ServingState:
    version: str  # the release being served (the active one when loaded)
    full_version: str  # the full release at the root of its chain
    model_version: str  # the full-model artifact behind the towers
    chain: tuple[str, ...]
    tower: ServingUserTower
    user_rows: Mapping[str, int]  # user ID -> row of id_table (not mutated after build)
    id_table: np.ndarray  # (R, id_dim) float32; row 0 is the cold-start embedding
    row_event_time_ms: np.ndarray  # (R,) int64: newest click each row learnt from; 0 = as the full model left it
    index: FaissRetriever  # the full release's items (shared by the chain, never changed)
    item_ids: tuple[str, ...]
    item_set: frozenset[str]  # the same IDs, for membership checks
    index_settings: IndexSettings  # the full release's, for the new-item index
    new_items: NewItemIndex  # items born since the full release (this release's); rows follow item_ids in searches
    newest_click_event_time_ms: int  # the newest click any embedding here learnt from
    newest_click_is_bound: bool  # True while only the full model's data bound it
    loaded_at: float  # wall time, seconds
    prerank: PrerankState | None = None  # the full release's pre-ranker, if it carries one
    # rows of newer releases read from the user-embeddings topic (topic_follower), ahead of the
    # store; replaced, never mutated: a state with more rows is a new state
    followed: Mapping[str, FollowedRow] = field(default_factory=lambda: MappingProxyType({}))
    followed_through: str | None = None  # the newest release whose rows were followed


@dataclass(frozen=True)
class FollowedRow:
    """One user's row as the user-embeddings topic carried it."""

    vector: np.ndarray  # (id_dim,) float32, read-only
    event_time_ms: int  # newest click it learnt from (0: as the full model left it)
    sequence: int  # of the release it belongs to
    release: str


@dataclass(frozen=True)
class RecallResult:
    item_ids: list[str]
    scores: list[float]  # cosine
    cold_start: bool  # the user has no published row: the default row 0 was used
    user_event_time_ms: int | None  # newest click the user's own row learnt from (None: not learnt online)
    new_items: int = 0  # of item_ids, how many were born since the full release


def _freeze(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)
    return array


def _load_full(release: Release, ef_search: int | None = None, prerank_config=None, on_timing=None) -> ServingState:
    where = f"release {release.version}"
    tower = ServingUserTower.load(release.file("user_tower.pt"))
    user_ids = json.loads(release.file("user_ids.json").read_text())
    table = np.load(release.file("user_embeddings.npy"))
    item_ids = json.loads(release.file("item_ids.json").read_text())
    index = FaissRetriever.load(release.file("index.faiss"))
    if ef_search is not None:
        index.set_ef_search(ef_search)  # HNSW only; exact indexes ignore it
    if table.shape != (len(user_ids), tower.id_dim):
        raise ReleaseError(f"{where}: user_embeddings {table.shape} does not fit {len(user_ids)} IDs x {tower.id_dim}")
    if len(index) != len(item_ids) or index.index.d != tower.output_dim:
        raise ReleaseError(f"{where}: index holds {len(index)} x {index.index.d}, expected {len(item_ids)} x {tower.output_dim}")
    settings = release.manifest.index.settings if isinstance(release.manifest, FullReleaseManifest) else {}
    try:
        index_settings = IndexSettings(**settings)
    except TypeError as error:
        raise ReleaseError(f"{where}: manifest field 'index.settings' does not fit: {error}") from error
    return ServingState(
        version=release.version,
        full_version=release.version,
        model_version=release.model_version,
        chain=(release.version,),
        tower=tower,
        user_rows={u: r for r, u in enumerate(user_ids) if u and r != 0},
        id_table=table.astype(np.float32, copy=False),
        row_event_time_ms=np.zeros(len(user_ids), dtype=np.int64),
        index=index,
        item_ids=tuple(item_ids),
        item_set=frozenset(item_ids),
        index_settings=index_settings,
        new_items=NewItemIndex.empty(),
        newest_click_event_time_ms=release.manifest.newest_click_event_time_ms,
        newest_click_is_bound=release.manifest.newest_click_is_bound,
        loaded_at=time.time(),
        prerank=load_prerank(release, prerank_config or PrerankConfig(), on_timing),
    )


def _apply_delta(state: ServingState, release: Release, *, copy: bool, new_items: bool = True, statistics: bool = True) -> ServingState:
    """``state`` with ``release``'s rows on top and its new items beside the
    full index; ``copy`` leaves ``state`` untouched (it may be serving
    requests right now). ``new_items=False`` skips building the new-item
    index (a link in the middle of a chain: the last one's replaces it);
    ``statistics=False`` skips its statistics snapshot (a later link's
    replaces it)."""
    where = f"release {release.version}"
    if release.kind != "embeddings" or release.parent != state.version or release.model_version != state.model_version:
        raise ReleaseError(f"{where} ({release.kind}, parent {release.parent}) does not apply to {state.version}")
    user_ids = json.loads(release.file("user_ids.json").read_text())
    vectors = np.load(release.file("user_embeddings.npy"))
    event_times = np.load(release.file("row_event_time_ms.npy"))
    if vectors.shape != (len(user_ids), state.tower.id_dim) or event_times.shape != (len(user_ids),):
        raise ReleaseError(
            f"{where}: {vectors.shape} embeddings, {event_times.shape} event times for {len(user_ids)} IDs x {state.tower.id_dim}"
        )
    user_rows = dict(state.user_rows) if copy else state.user_rows
    new_ids = [u for u in user_ids if u not in user_rows]
    old_rows = len(state.id_table)
    for offset, user_id in enumerate(new_ids):
        user_rows[user_id] = old_rows + offset
    if copy or new_ids:
        table = np.empty((old_rows + len(new_ids), state.tower.id_dim), dtype=np.float32)  # (R', id_dim)
        table[:old_rows] = state.id_table
        times = np.zeros(old_rows + len(new_ids), dtype=np.int64)
        times[:old_rows] = state.row_event_time_ms
    else:  # a private state being built: write in place
        table, times = state.id_table, state.row_event_time_ms
    rows = np.fromiter((user_rows[u] for u in user_ids), dtype=np.int64, count=len(user_ids))
    table[rows] = vectors
    times[rows] = event_times
    learnt = int(event_times.max()) if len(event_times) else 0
    return ServingState(
        version=release.version,
        full_version=state.full_version,
        model_version=state.model_version,
        chain=state.chain + (release.version,),
        tower=state.tower,
        user_rows=user_rows,
        id_table=_freeze(table) if copy else table,
        row_event_time_ms=_freeze(times) if copy else times,
        index=state.index,
        item_ids=state.item_ids,
        item_set=state.item_set,
        index_settings=state.index_settings,
        new_items=(
            NewItemIndex.of_release(release, state.item_set, state.tower.output_dim, state.index_settings)
            if new_items
            else NewItemIndex.empty()
        ),
        newest_click_event_time_ms=max(state.newest_click_event_time_ms, release.manifest.newest_click_event_time_ms, learnt),
        newest_click_is_bound=state.newest_click_is_bound and learnt <= 0,
        loaded_at=time.time(),
        prerank=None if state.prerank is None else _prerank_of(state.prerank, release, statistics),
    )


def _prerank_of(prerank: PrerankState, release: Release, statistics: bool) -> PrerankState:
    prerank = with_user_rows(prerank, release)
    return with_statistics(prerank, release) if statistics else prerank


def load_state(
    store: ReleaseStore,
    version: str,
    current: ServingState | None = None,
    ef_search: int | None = None,
    prerank_config: PrerankConfig | None = None,
    on_timing=None,
) -> ServingState:
    """Verify and load what serving ``version`` needs. Raises ``ReleaseError``
    (naming the release and file) if anything is missing or corrupt.
    ``ef_search`` overrides the HNSW efSearch stored in the index."""
    release = store.get(version)
    if current is not None and release.kind == "embeddings" and release.parent == current.version:
        store.verify(version)
        return _apply_delta(current, release, copy=True)
    chain = store.chain(version)
    for link in chain:
        store.verify(link.version)
    try:
        state = _load_full(chain[0], ef_search, prerank_config, on_timing)
    except (OSError, ValueError, RuntimeError) as error:
        if isinstance(error, ReleaseError):
            raise
        raise ReleaseError(f"release {chain[0].version}: cannot load: {error}") from error
    with_statistics_at = max((n for n, link in enumerate(chain, start=1) if getattr(link.manifest, "statistics_as_of_ms", None) is not None),
                             default=0)  # only the newest snapshot counts: each is complete
    for n, link in enumerate(chain[1:], start=2):  # a private state: no copies needed
        state = _apply_delta(state, link, copy=False, new_items=n == len(chain), statistics=n == with_statistics_at)
    _freeze(state.id_table)
    _freeze(state.row_event_time_ms)
    return state


def user_row(state: ServingState, user_id: str) -> tuple[np.ndarray, int, bool]:
    """The user's served ID row, the event time it learnt up to (0: unknown),
    and whether it is the cold-start row: a followed row first, then the release's."""
    followed = state.followed.get(user_id) if state.followed else None
    if followed is not None:
        return followed.vector, followed.event_time_ms, False
    row = state.user_rows.get(user_id)
    if row is None:
        return state.id_table[0], 0, True
    return state.id_table[row], int(state.row_event_time_ms[row]), False


def recall(state: ServingState, user_id: str, features: Mapping[str, object], k: int) -> RecallResult:
    """Top-k items by cosine for one user: the user vector from their latest
    published ID row (row 0 if they have none) and ``features``, then the
    release's index. Raises ``FeatureError`` for features that do not fit."""
    row_vector, event_time, cold_start = user_row(state, user_id)
    user_vector = state.tower.vector(row_vector, features)  # (D,)
    scores, indices = state.index.search_one(user_vector, min(k, len(state.item_ids)))  # (k,), (k,)
    new_items = state.new_items
    if new_items.index is not None:
        new_scores, new_indices = new_items.index.search_one(user_vector, min(k, len(new_items)))
        merged_scores, merged = merge_top_k(scores[None], indices[None], new_scores[None], new_indices[None], len(state.item_ids), k)
        scores, indices = merged_scores[0], merged[0]
    if len(indices) and indices[-1] < 0:  # fewer than k found: Faiss pads with -1 at the end
        found = indices >= 0
        scores, indices = scores[found], indices[found]
    item_ids, born, full_size = state.item_ids, new_items.item_ids, len(state.item_ids)
    return RecallResult(
        item_ids=[item_ids[i] if i < full_size else born[i - full_size] for i in indices.tolist()],
        scores=scores.tolist(),
        cold_start=cold_start,
        user_event_time_ms=event_time or None,
        new_items=int((indices >= full_size).sum()),
    )


def search(state: ServingState, vectors: np.ndarray, k: int) -> np.ndarray:
    """(U, k) rows of the top-k items for (U, D) user ``vectors``, over the
    full release's index and the new items beside it: rows below
    ``len(state.item_ids)`` index ``item_ids``, the others ``new_items``
    (shifted by that length); -1 pads past the last item found."""
    k = min(k, len(state.item_ids) + len(state.new_items))
    scores, rows = state.index.search(vectors, min(k, len(state.item_ids)))  # (U, k1)
    if state.new_items.index is not None:
        new_scores, new_rows = state.new_items.index.search(vectors, min(k, len(state.new_items)))  # (U, k2)
        scores, rows = merge_top_k(scores, rows, new_scores, new_rows, len(state.item_ids), k)
    return rows


def served_item_ids(state: ServingState) -> tuple[str, ...]:
    """Item ID per row of ``search``: the full release's, then the new items."""
    return state.item_ids + state.new_items.item_ids
