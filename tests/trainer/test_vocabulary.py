from __future__ import annotations

from freshtower.trainer.vocabulary import DEFAULT_ROW, IdVocabulary


def test_ids_share_the_default_row_until_min_count_sightings():
    vocab = IdVocabulary(min_count=3)
    assert vocab.observe(["a", "a"], day=0).tolist() == []
    assert vocab.lookup(["a"]).tolist() == [DEFAULT_ROW]
    assert vocab.observe(["a", "b"], day=1).tolist() == [1]  # third sighting of "a"
    assert vocab.lookup(["a", "b"]).tolist() == [1, DEFAULT_ROW]
    assert len(vocab) == 2 and vocab.admitted == 1


def test_rows_are_collisionless_and_stable():
    vocab = IdVocabulary(min_count=1)
    ids = [f"user-{n}" for n in range(1000)]
    vocab.observe(ids, day=0)
    rows = vocab.lookup(ids)
    assert len(set(rows.tolist())) == 1000 and DEFAULT_ROW not in rows
    vocab.observe(ids[::-1], day=1)
    assert vocab.lookup(ids).tolist() == rows.tolist()


def test_expiry_frees_rows_for_reuse():
    vocab = IdVocabulary(min_count=1, expiry_days=7)
    vocab.observe(["old", "kept"], day=0)
    vocab.observe(["kept"], day=9)
    freed = vocab.expire(today=9)  # "old" last seen on day 0 < 9 - 7
    assert freed.tolist() == [1]
    assert vocab.lookup(["old", "kept"]).tolist() == [DEFAULT_ROW, 2]
    assert vocab.observe(["new"], day=9).tolist() == [1]  # reuses the freed row
    assert vocab.id_of(1) == "new"


def test_pending_sightings_expire_too():
    vocab = IdVocabulary(min_count=2, expiry_days=3)
    vocab.observe(["rare"], day=0)
    vocab.expire(today=10)
    assert vocab.observe(["rare"], day=10).tolist() == []  # the old sighting was forgotten


def test_empty_ids_stay_unknown():
    vocab = IdVocabulary(min_count=1)
    assert vocab.observe(["", ""], day=0).tolist() == []
    assert vocab.lookup([""]).tolist() == [DEFAULT_ROW]


def test_state_round_trips():
    vocab = IdVocabulary(min_count=2, expiry_days=5)
    vocab.observe(["a", "a", "b", "c", "c"], day=4)
    vocab.expire(today=4)
    restored = IdVocabulary.from_state_dict(vocab.state_dict())
    assert restored.lookup(["a", "b", "c"]).tolist() == vocab.lookup(["a", "b", "c"]).tolist()
    assert restored.observe(["b"], day=4).tolist() == vocab.observe(["b"], day=4).tolist()
