"""The release the recall service serves now, and its hot swap.

``LiveRelease.state`` is the one reference a swap replaces. A new release is
loaded and verified off the event loop (``load_state`` checks every file's
SHA-256), then the reference is assigned: a request reads it once, so it
finishes on the state it started with and none fails during a swap. A
release that fails to load is remembered as refused, with the reason, and
the current state stays. Swaps are serialised by one lock: the watcher's
(``refresh``, every ``service.poll_seconds``) and an admin's (``activate``).
With ``follow``, rows of newer releases from the user-embeddings topic are
applied on top between swaps, and carried over a swap while they are still
newer than what was loaded (``topic_follower``).
"""

from __future__ import annotations

import asyncio
import logging

from freshtower.publisher.releases import ReleaseError, ReleaseStore
from freshtower.publisher.service_metrics import ServiceMetrics
from freshtower.publisher.serving import ServingState, load_state
from freshtower.publisher.topic_follower import TopicFollower, apply_rows, carry_rows, sequence_of

log = logging.getLogger(__name__)


class LiveRelease:
    """Build it on the event loop that serves (the app's lifespan): its lock belongs there."""

    def __init__(self, store: ReleaseStore, metrics: ServiceMetrics, ef_search: int | None = None, prerank_config=None):
        self.store = store
        self.metrics = metrics
        self.ef_search = ef_search  # HNSW efSearch set on every loaded index (None: as published)
        self.prerank_config = prerank_config  # the service's [prerank]: item cache size, most candidates
        self.state: ServingState | None = None
        self.refused: dict[str, str] = {}  # version -> why it is not served
        self._swap_lock = asyncio.Lock()
        self.follower: TopicFollower | None = None  # set by follow()
        self.follow_floor = 0  # topic rows of releases up to this sequence are not applied (a rollback)

    # --- following the user-embeddings topic ----------------------------------------

    def follow(self, bootstrap_servers: str, topic: str) -> TopicFollower:
        """Apply newer rows from the topic as they arrive (``topic_follower``); call on the serving loop."""
        loop = asyncio.get_running_loop()
        self.follower = TopicFollower(
            bootstrap_servers,
            topic,
            on_rows=lambda rows: loop.call_soon_threadsafe(self.apply_followed, rows),
            ready=lambda: self.state is not None,
            on_malformed=lambda n: loop.call_soon_threadsafe(self.metrics.followed.labels("malformed").inc, n),
        )
        return self.follower.start()

    def apply_followed(self, rows: list[dict]) -> None:
        """On the serving loop: the followed rows on top of the served state (one reference swap)."""
        if self.state is None:
            return
        done = apply_rows(self.state, rows, self.follow_floor)
        self.state = done.state
        self.metrics.followed.labels("applied").inc(done.applied)
        self.metrics.followed.labels("skipped").inc(done.skipped)

    def pointer(self) -> str | None:
        """What ACTIVE names, or why it cannot be read (for messages)."""
        try:
            return self.store.active_version()
        except ReleaseError as error:
            return f"unreadable: {error}"

    async def _load(self, version: str) -> tuple[ServingState, int | None]:
        """Load and verify ``version`` off the event loop; raises ReleaseError.
        Also, if serving it goes back (a rollback), the newest sequence in the store."""
        current = self.state

        def load() -> tuple[ServingState, int | None]:
            state = load_state(self.store, version, current, self.ef_search, self.prerank_config, self.metrics.prerank_timing)
            back = current is not None and sequence_of(version) < sequence_of(current.version)
            return state, max(map(sequence_of, self.store.versions()), default=0) if back else None

        return await asyncio.to_thread(load)

    def _swap(self, loaded: tuple[ServingState, int | None]) -> None:
        state, newest = loaded
        if newest is not None:  # gone back: rows of the releases rolled back from stay unapplied
            self.follow_floor = max(self.follow_floor, newest)
        state = carry_rows(self.state, state, self.follow_floor)  # rows followed since the load began
        self.state = state  # the hot swap: one reference assignment
        self.metrics.swapped(state)
        log.info("serving release %s (chain %s)", state.version, " -> ".join(state.chain))

    async def refresh(self) -> None:
        """Serve what ACTIVE names, unless it is served already or was refused."""
        version = await asyncio.to_thread(self.store.active_version)
        if version is None or version in self.refused or self._serves(version):
            return
        async with self._swap_lock:
            if self._serves(version):
                return
            try:
                self._swap(await self._load(version))
            except (ReleaseError, OSError, ValueError) as error:
                self.refused[version] = str(error)
                self.metrics.refused.inc()
                log.error("refused release %s, still serving %s: %s", version, self.state and self.state.version, error)

    def _serves(self, version: str) -> bool:
        return self.state is not None and self.state.version == version

    async def watch(self, poll_seconds: float, wakeup=None) -> None:
        """Follow ACTIVE until cancelled: every ``poll_seconds``, or at once
        when ``wakeup`` (a ``freshtower.core.announcements.Wakeup`` on the
        release announcements) says a release was announced."""
        while True:
            try:
                await self.refresh()
            except Exception:  # a broken store must not kill the watcher
                log.exception("reading the active release from %s failed", self.store.root)
            if wakeup is None:
                await asyncio.sleep(poll_seconds)
            else:
                await asyncio.to_thread(wakeup.wait, poll_seconds)

    async def activate(self, version: str, by: str) -> str | None:
        """Load ``version``, then point ACTIVE at it and serve it (a rollback
        or roll-forward); returns the version ACTIVE named before. Raises
        ReleaseError, with nothing changed, if it cannot be served."""
        async with self._swap_lock:
            try:
                loaded = await self._load(version)
                previous = await asyncio.to_thread(self.store.activate, version, by=by)
            except ReleaseError:
                self.metrics.refused.inc()
                raise
            self.refused.pop(version, None)
            self._swap(loaded)
        log.warning("release %s activated by %s (was %s)", version, by, previous)
        return previous
