"""What the long-running parts do in their processes: the loops behind
``freshtower train online`` and ``freshtower publish``, which the
supervisor starts as children and stops with SIGTERM.

Each loop ends at its next check once ``should_stop()`` is true
(``StopFlag`` turns SIGTERM / SIGINT into that); what it learns or
publishes goes to ``say`` / ``report`` callbacks, so the CLI only prints.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from freshtower.core.settings import Settings


class StopFlag:
    """True once SIGTERM or SIGINT arrived (after ``install``)."""

    def __init__(self):
        self.stopped = False

    def install(self) -> StopFlag:
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)
        return self

    def _set(self, *_) -> None:
        self.stopped = True

    def __call__(self) -> bool:
        return self.stopped


def follow_online(
    settings: Settings,
    partition: str = "0/1",
    *,
    follow: bool = False,
    poll_seconds: float = 1.0,
    max_batches: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    say: Callable[[str], None] = print,
    on_batch=None,
):
    """Start the online trainer on the newest full model and train the
    pending batches (with ``follow``: keep following new batches and full
    models until ``should_stop()``); returns ``(trainer, stats)``, or None
    when stopped before the first full model came. Without ``follow`` a
    missing full model raises ``MissingModelError``; with it, it is waited
    for (a fresh pipeline's first model comes when its first day is complete)."""
    from freshtower.trainer.online import MissingModelError, OnlineTrainer, Partition

    waiting_said = False
    while True:
        try:
            trainer = OnlineTrainer.start(settings, Partition.parse(partition))
            break
        except MissingModelError:
            if not follow:
                raise
            if not waiting_said:
                say("waiting for the first full model ...")
                waiting_said = True
            if should_stop():
                return None
            time.sleep(poll_seconds)
    stats = trainer.run(follow=follow, poll_seconds=poll_seconds, max_batches=max_batches, should_stop=should_stop, on_batch=on_batch)
    return trainer, stats


def publish(
    settings: Settings,
    *,
    once: bool = False,
    force: bool = False,
    kafka: bool = True,
    max_releases: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    report: Callable = lambda outcome: None,
    say: Callable[[str], None] = print,
) -> None:
    """Publish releases: with ``once`` one tick (``force``: the changed user
    rows even if not due), else ticks until ``should_stop()`` or
    ``max_releases``. Rows also go to the user-embeddings topic when
    ``kafka`` and ``publisher.kafka_enabled``. Each outcome goes to
    ``report``; a ``ReleaseError`` ends it."""
    from freshtower.publisher.embedding_topic import EmbeddingTopic
    from freshtower.publisher.publish import Publisher

    config = settings.publisher
    topic = None
    if config.kafka_enabled and kafka:
        topic = EmbeddingTopic(settings.bootstrap_servers, settings.topics.user_embeddings, config.topic_partitions, config.topic_replication)
    with Publisher(settings, topic=topic) as publisher:
        if once:
            for outcome in publisher.tick(force_delta=force):
                report(outcome)
        else:
            say(f"publishing to {settings.releases_dir} every {config.publish_interval_seconds:g} s ({config.clock} clock); Ctrl-C stops")
            publisher.run(should_stop=should_stop, max_releases=max_releases, report=report)
