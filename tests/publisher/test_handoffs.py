"""Event-driven hand-offs on a real broker: a batch announced on
``training-batches`` is trained long before the fallback listing interval,
the trainer's checkpoint is announced for the publisher, the publisher's
release for the service; without announcements the fallback poll still
hands the batch over."""

from __future__ import annotations

import shutil
import threading
import time
import uuid

import pytest

from freshtower.app.parts import follow_online
from freshtower.core.announcements import Announcer, Wakeup
from tests.conftest import make_settings

DAY2 = "2026-11-22"


def _settings(data_dir, bootstrap, **overrides):
    prefix = f"h{uuid.uuid4().hex[:8]}"
    topics = {"training_batches": f"{prefix}-batches", "online_checkpoints": f"{prefix}-ckpt", "releases": f"{prefix}-releases"}
    training = {"online_poll_seconds": 30.0, "checkpoint_every_seconds": 0.0, **overrides.pop("training", {})}
    return make_settings(data_dir, kafka=bootstrap, topics=topics, training=training, **overrides)


class _Follower:
    """``follow_online`` in a thread, recording when each batch was trained."""

    def __init__(self, settings):
        self.trained_at: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=follow_online,
            args=(settings,),
            kwargs=dict(follow=True, should_stop=self.stop.is_set, say=lambda _: None, on_batch=lambda r: self.trained_at.append(time.time())),
            daemon=True,
        )

    def wait_trained(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.trained_at) >= count:
                return True
            time.sleep(0.05)
        return False

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)


def _hold_back_day2(data_dir, tmp_path):
    held = tmp_path / "held"
    shutil.move(str(data_dir / "batches" / DAY2), held)
    return held


@pytest.mark.slow
def test_an_announced_batch_is_trained_within_seconds_not_at_the_poll_interval(data_dir, tmp_path, kafka_broker):
    settings = _settings(data_dir, kafka_broker.bootstrap)
    held = _hold_back_day2(data_dir, tmp_path)
    announcer = Announcer(settings.bootstrap_servers, settings.topics.training_batches)
    assert announcer.announce({"path": "none", "note": "creates the topic"})
    checkpoints = Wakeup(settings.bootstrap_servers, settings.topics.online_checkpoints).start()
    with _Follower(settings) as follower:
        assert follower.wait_trained(1, 120), "day 1 was not trained at start"
        time.sleep(3.0)  # caught up on day 1, now waiting (30 s fallback); its wakeup follows the topic
        before = len(follower.trained_at)
        shutil.move(str(held), data_dir / "batches" / DAY2)  # the streams worker's files are durable first ...
        announced = time.time()
        assert announcer.announce({"path": f"{DAY2}/*"})  # ... then announced
        assert follower.wait_trained(before + 1, 10), "the announced batch was not trained within 10 s"
        delay = follower.trained_at[before] - announced
    announcer.close()
    assert delay < 5.0, f"trained {delay:.1f} s after the announcement (fallback poll 30 s)"
    # each checkpoint went out on the checkpoint topic for the publisher
    assert checkpoints.received >= 1 and checkpoints.last["step"] > 0
    checkpoints.close()


@pytest.mark.slow
def test_without_announcements_the_fallback_listing_still_hands_the_batch_over(data_dir, tmp_path, kafka_broker):
    settings = _settings(data_dir, kafka_broker.bootstrap, training={"online_poll_seconds": 2.0})
    held = _hold_back_day2(data_dir, tmp_path)
    with _Follower(settings) as follower:
        assert follower.wait_trained(1, 120)
        time.sleep(3.0)
        before = len(follower.trained_at)
        shutil.move(str(held), data_dir / "batches" / DAY2)  # no announcement at all
        moved = time.time()
        assert follower.wait_trained(before + 1, 15), "the fallback listing did not find the batch"
        assert follower.trained_at[before] - moved < 6.0


def test_a_wakeup_on_an_unreachable_broker_is_a_plain_timeout():
    wakeup = Wakeup("127.0.0.1:1", "nothing", retry_seconds=0.2).start()
    started = time.monotonic()
    assert wakeup.wait(0.5) is False
    assert 0.4 < time.monotonic() - started < 2.0
    wakeup.close()
    assert Announcer("127.0.0.1:1", "nothing").announce({"x": 1}) is False
