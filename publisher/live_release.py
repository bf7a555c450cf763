"""The release the recall service serves now, and its hot swap.

``LiveRelease.state`` is the one reference a swap replaces. A new release is
loaded and verified off the event loop (``load_state`` checks every file's
SHA-256), then the reference is assigned: a request reads it once, so it
finishes on the state it started with and none fails during a swap. A
release that fails to load is remembered as refused, with the reason, and
the current state stays. Swaps are serialised by one lock: the watcher's
(``refresh``, every ``service.poll_seconds``) and an admin's (``activate``).
"""

from __future__ import annotations

import asyncio
import logging

from freshtower.publisher.releases import ReleaseError, ReleaseStore
from freshtower.publisher.service_metrics import ServiceMetrics
from freshtower.publisher.serving import ServingState, load_state

log = logging.getLogger(__name__)


class LiveRelease:
    """Build it on the event loop that serves (the app's lifespan): its lock belongs there."""

    def __init__(self, store: ReleaseStore, metrics: ServiceMetrics, ef_search: int | None = None):
        self.store = store
        self.metrics = metrics
        self.ef_search = ef_search  # HNSW efSearch set on every loaded index (None: as published)
        self.state: ServingState | None = None
        self.refused: dict[str, str] = {}  # version -> why it is not served
        self._swap_lock = asyncio.Lock()

    def pointer(self) -> str | None:
        """What ACTIVE names, or why it cannot be read (for messages)."""
        try:
            return self.store.active_version()
        except ReleaseError as error:
            return f"unreadable: {error}"

    async def _load(self, version: str) -> ServingState:
        """Load and verify ``version`` off the event loop; raises ReleaseError."""
        return await asyncio.to_thread(load_state, self.store, version, self.state, self.ef_search)

    def _swap(self, state: ServingState) -> None:
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
                state = await self._load(version)
                previous = await asyncio.to_thread(self.store.activate, version, by=by)
            except ReleaseError:
                self.metrics.refused.inc()
                raise
            self.refused.pop(version, None)
            self._swap(state)
        log.warning("release %s activated by %s (was %s)", version, by, previous)
        return previous
