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
    poll_seconds: float | None = None,
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
    for (a fresh pipeline's first model comes when its first day is complete).

    With ``follow`` it wakes on the batch announcements (``training-batches``)
    and lists the files every ``poll_seconds`` (default
    ``training.online_poll_seconds``) only as the fallback; each checkpoint
    is announced on ``topics.online_checkpoints`` for the publisher."""
    from freshtower.trainer.online import MissingModelError, OnlineTrainer, Partition

    from freshtower.core.announcements import Announcer, Wakeup

    poll_seconds = settings.training.online_poll_seconds if poll_seconds is None else poll_seconds
    a = settings.announcements
    on = follow and a.enabled
    wakeup = Wakeup(settings.bootstrap_servers, settings.topics.training_batches, enabled=on, fetch_wait_ms=a.fetch_wait_ms,
                    retry_seconds=a.retry_seconds).start()
    announcer = Announcer(settings.bootstrap_servers, settings.topics.online_checkpoints, enabled=on, retry_seconds=a.retry_seconds)
    try:
        return _follow_online(settings, partition, follow, poll_seconds, max_batches, should_stop, say, on_batch, wakeup, announcer)
    finally:
        wakeup.close()
        announcer.close()


def _follow_online(settings, partition, follow, poll_seconds, max_batches, should_stop, say, on_batch, wakeup, announcer):
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
            time.sleep(min(poll_seconds, 1.0))
    trainer.on_checkpoint = lambda path, c: announcer.announce(
        {"path": str(path), "step": c.step, "newest_event_time_ms": c.newest_event_time_ms, "partition": list(c.partition),
         "base_version": c.base_version, "batches": trainer.checkpointed_batches}
    )
    stats = trainer.run(
        follow=follow, poll_seconds=poll_seconds, max_batches=max_batches, should_stop=should_stop, on_batch=on_batch, wait=wakeup.wait
    )
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
    from freshtower.core.announcements import Announcer, Wakeup

    a = settings.announcements
    announcer = Announcer(settings.bootstrap_servers, settings.topics.releases, enabled=a.enabled and kafka, retry_seconds=a.retry_seconds)
    wakeup = Wakeup(settings.bootstrap_servers, settings.topics.online_checkpoints, enabled=a.enabled and kafka and not once,
                    fetch_wait_ms=a.fetch_wait_ms, retry_seconds=a.retry_seconds).start()

    def announced(outcome) -> None:
        if outcome.status == "published":  # the service swaps on it rather than at its next poll
            announcer.announce({"version": outcome.version, "kind": outcome.kind, "rows": outcome.rows})
        report(outcome)

    try:
        with Publisher(settings, topic=topic) as publisher:
            if once:
                for outcome in publisher.tick(force_delta=force):
                    announced(outcome)
            else:
                say(f"publishing to {settings.releases_dir} every {config.publish_interval_seconds:g} s ({config.clock} clock); Ctrl-C stops")
                publisher.run(should_stop=should_stop, max_releases=max_releases, report=announced, wait=wakeup.wait)
    finally:
        wakeup.close()
        announcer.close()
