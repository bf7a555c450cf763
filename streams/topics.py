"""The Kafka topics of the streams stage and their creation.

=================== ======================== =====================================
topic               key                      value
=================== ======================== =====================================
impressions         user_id                  impression JSON (``streams/events.py``)
clicks              user_id                  click JSON
rank-logs           user_id                  rank-log JSON
dead-letters        original key             envelope JSON (``streams/dead_letters.py``)
training-batches    window start (ISO)       announcement JSON (``streams/sink.py``)
<app_id>-<input>-   user_id                  the input event as it arrived, on the
repartition                                  partition murmur2(user_id) gives
=================== ======================== =====================================

The three input topics must have the same partition count: producers key
by user_id with the same (murmur2) partitioner, so a user's impression,
clicks and rank logs land on the same partition number and the join state
of a request lives in that partition of the changelog. An event that a
producer with another partitioner (librdkafka's CRC32 default) put on
another partition is forwarded by the worker that reads it to the input
topic's repartition topic, on murmur2's partition (``streams.repartition``),
as Kafka Streams and Faust's ``group_by`` do; the worker reads those topics
beside the inputs, as the same kinds of event.
"""

from __future__ import annotations

import logging

from freshtower.core.settings import Settings

log = logging.getLogger(__name__)


def input_topics(settings: Settings) -> dict[str, str]:
    """Topic name -> event kind (``streams.events`` constants)."""
    from freshtower.streams.events import CLICK, IMPRESSION, RANK_LOG

    t = settings.topics
    return {t.impressions: IMPRESSION, t.clicks: CLICK, t.rank_logs: RANK_LOG}


def repartition_topics(settings: Settings) -> dict[str, str]:
    """Input topic -> its repartition topic (none when
    ``streams.repartition`` or ``streams.check_partitioner`` is off)."""
    s = settings.streams
    if not (s.repartition and s.check_partitioner):
        return {}
    return {topic: f"{s.app_id}-{topic}-repartition" for topic in input_topics(settings)}


def worker_topics(settings: Settings) -> dict[str, str]:
    """Every topic the worker joins -> its event kind: the inputs and
    their repartition topics."""
    kinds = input_topics(settings)
    return {**kinds, **{again: kinds[topic] for topic, again in repartition_topics(settings).items()}}


def ensure_topics(settings: Settings, timeout_ms: int = 10_000) -> list[str]:
    """Create the streams topics that do not exist yet; return the created ones."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    t = settings.topics
    partitions = settings.streams.partitions
    joined = list(worker_topics(settings))  # the inputs and their repartition topics
    wanted = {
        **{name: partitions for name in joined},
        t.dead_letters: 1,
        t.training_batches: 1,  # one partition: announcements stay in window order
    }
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=timeout_ms, client_id="freshtower-topics")
    try:
        existing = set(admin.list_topics())
        _check_partitions(settings, admin, [name for name in joined if name in existing])
        missing = [NewTopic(name, count, 1) for name, count in wanted.items() if name not in existing]
        created = []
        for topic in missing:
            try:
                admin.create_topics([topic], timeout_ms=timeout_ms)
                created.append(topic.name)
            except TopicAlreadyExistsError:
                pass  # another process won the race
        if created:
            log.info("created topics %s", created)
        return created
    finally:
        admin.close()


def _check_partitions(settings: Settings, admin, topics: list[str]) -> None:
    """The input topics must have ``streams.partitions`` partitions each:
    the join state of a request goes to the changelog partition of its
    events' partition."""
    if not topics:
        return
    counts = {d["name"]: len(d["partitions"]) for d in admin.describe_topics(topics)}
    wrong = {topic: n for topic, n in counts.items() if n != settings.streams.partitions}
    if wrong:
        raise RuntimeError(
            f"input topics {wrong} do not have streams.partitions = {settings.streams.partitions} partitions; "
            f"set FRESHTOWER_STREAMS__PARTITIONS to their count (all must be equal)"
        )
