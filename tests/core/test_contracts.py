"""The on-disk contracts: each round-trips through its one writer and one
reader, and a file that does not fit fails at load naming the file and the field."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from freshtower.core.contracts import (
    CheckpointRead,
    ContractError,
    Dims,
    EmbeddingsReleaseManifest,
    EventTimeRange,
    FullModelManifest,
    FullReleaseManifest,
    IndexSummary,
    LineageEntry,
    ModelSummary,
    NewItems,
    RecallChecks,
    VocabularyState,
    release_manifest_from_json,
)
from freshtower.core.contracts.online_checkpoint import (
    CheckpointStats,
    OnlineCheckpoint,
    read_online_checkpoint,
    write_online_checkpoint,
)
from freshtower.core.storage import FileDigest

DIGEST = FileDigest(sha256="ab" * 32, bytes=1234)


def full_model_manifest() -> FullModelManifest:
    return FullModelManifest(
        version="2026-11-21.2",
        day="2026-11-21",
        created_at=1_795_300_000.5,
        parent="2026-11-20.1",
        from_scratch=False,
        data_start_ms=1_795_219_200_000,
        data_end_ms=1_795_295_000_000,
        newest_click_event_time_ms=1_795_294_999_000,
        holdout_start_ms=1_795_305_000_000,
        holdout_end_ms=1_795_305_600_000,
        metrics={"exact": {"recall@50": 0.31}, "train_samples": 4_200, "expired": {"users": 3}},
        lineage=[LineageEntry(file="2026-11-21/000000.tfrecord", sha256="cd" * 32, positives=12, role="train")],
        config={"training": {"mode": "listwise"}},
        files={"model.pt": DIGEST},
    )


def full_release_manifest() -> FullReleaseManifest:
    return FullReleaseManifest(
        version="00000003-full",
        parent="00000002-embeddings",
        full_version="00000003-full",
        model_version="2026-11-21.2",
        created_at=1_795_300_100.0,
        online_steps={},
        checkpoint_event_time_ms=1_795_295_000_000,
        event_time=EventTimeRange(start_ms=1_795_219_200_000, end_ms=1_795_295_000_000),
        newest_click_event_time_ms=1_795_294_999_000,
        newest_click_is_bound=False,
        rows={"user_embeddings": 501, "items": 300},
        dims=Dims(id_dim=64, output_dim=64),
        index=IndexSummary(kind="IndexFlatIP", settings={"hnsw_m": 32}, build_seconds=0.01, recall_at_100_vs_exact=1.0, check_queries=200),
        checks=RecallChecks(holdout_recall_at_50=0.31, active_holdout_recall_at_50=0.30, max_recall_drop=0.02),
        model=ModelSummary(version="2026-11-21.2", day="2026-11-21", parent="2026-11-20.1", created_at=1_795_300_000.5, metrics={}),
        config={},
        files={"user_embeddings.npy": DIGEST, "index.faiss": DIGEST},
    )


def embeddings_release_manifest() -> EmbeddingsReleaseManifest:
    return EmbeddingsReleaseManifest(
        version="00000004-embeddings",
        parent="00000003-full",
        full_version="00000003-full",
        model_version="2026-11-21.2",
        created_at=1_795_301_900.0,
        online_steps={"checkpoint-0-of-2.pt": 17, "checkpoint-1-of-2.pt": 15},
        checkpoints={
            "checkpoint-0-of-2.pt": CheckpointRead(step=17, since=0, rows=40, written_at=1_795_301_800.0),
            "checkpoint-1-of-2.pt": CheckpointRead(step=15, since=0, rows=38, written_at=None),
        },
        resync=[],
        checkpoint_event_time_ms=1_795_296_800_000,
        event_time=EventTimeRange(start_ms=None, end_ms=None),
        newest_click_event_time_ms=1_795_296_799_000,
        newest_click_is_bound=False,
        rows={"user_embeddings": 78, "new_items": 5},
        dims=Dims(id_dim=64, output_dim=64),
        config={},
        files={"user_embeddings.npy": DIGEST, "new_item_ids.json": DIGEST, "new_item_vectors.npy": DIGEST},
        new_items=NewItems(count=5, seen_since_ms=1_795_219_200_000, seconds=0.01),
    )


def online_checkpoint() -> OnlineCheckpoint:
    rows = 4
    return OnlineCheckpoint(
        base_version="2026-11-21.2",
        partition=(1, 2),
        next_window_ms=1_795_295_060_000,
        trained_recent=["2026-11-21/000100-p0"],
        newest_window_ms=1_795_295_120_000,
        step=9,
        newest_event_time_ms=1_795_295_170_000,
        user_table=torch.arange(rows * 3, dtype=torch.float32).reshape(rows, 3),  # (R, id_dim)
        user_ids=VocabularyState(min_count=1, expiry_days=30, row_ids=["", "u1", "", "u3"], last_seen=[0, 20_413, 0, 20_413], pending_ids=["u9"], pending=[[1, 20_413]]),
        optimizer={"sum": torch.ones(rows, 3), "step": 9},
        row_updated_step=torch.tensor([0, 9, 0, 4]),
        row_event_time_ms=torch.tensor([0, 1_795_295_170_000, 0, 1_795_295_100_000]),
        estimator={"last_step": torch.zeros(2, 8, dtype=torch.int64)},
        catalogue={"ids": ["i1"]},
        pending_clicks={"capacity": 100, "clicks": {}},
        learner_steps=9,
        rng_state=np.random.default_rng(0).bit_generator.state,
        written_at=1_795_301_800.0,
        stats=CheckpointStats(batches=3, samples=120, rebases=0),
    )


# --- round trips ------------------------------------------------------------------------


def test_the_full_model_manifest_round_trips_through_json():
    manifest = full_model_manifest()
    raw = manifest.to_json()
    assert json.loads(raw)["format"] == 2 and json.loads(raw)["files"]["model.pt"] == {"sha256": "ab" * 32, "bytes": 1234}
    assert FullModelManifest.from_json(raw, "m.json") == manifest
    assert manifest.holdout_recall(50) == 0.31 and manifest.holdout_recall(10) is None and manifest.train_samples == 4_200


@pytest.mark.parametrize("make", [full_release_manifest, embeddings_release_manifest])
def test_both_kinds_of_release_manifest_round_trip_and_come_back_as_their_kind(make):
    manifest = make()
    back = release_manifest_from_json(manifest.to_json(), "m.json")
    assert back == manifest and type(back) is type(manifest)
    assert json.loads(manifest.to_json())["kind"] == manifest.kind


def test_the_online_checkpoint_round_trips_through_its_torch_file(tmp_path):
    checkpoint = online_checkpoint()
    path = tmp_path / "online" / "checkpoint-1-of-2.pt"
    write_online_checkpoint(path, checkpoint)
    back = read_online_checkpoint(path)
    tensors = ("user_table", "row_updated_step", "row_event_time_ms")
    for name in tensors:
        assert torch.equal(getattr(back, name), getattr(checkpoint, name)), name
    assert torch.equal(back.optimizer["sum"], checkpoint.optimizer["sum"]) and back.optimizer["step"] == 9
    assert torch.equal(back.estimator["last_step"], checkpoint.estimator["last_step"])
    plain = {f.name for f in dataclasses.fields(OnlineCheckpoint)} - set(tensors) - {"optimizer", "estimator"}
    assert {n: getattr(back, n) for n in plain} == {n: getattr(checkpoint, n) for n in plain}
    assert back.partition == (1, 2) and back.user_ids.row_ids == ["", "u1", "", "u3"] and back.rows == 4
    # the file is a plain dict of tensors and lists: it loads with weights_only, partition as a list
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == 2 and raw["partition"] == [1, 2] and raw["user_ids"]["row_ids"] == ["", "u1", "", "u3"]
    assert not list(path.parent.glob(".*tmp*"))  # written under a temporary name, renamed into place


def test_an_id_vocabulary_round_trips_through_its_state():
    from freshtower.trainer.vocabulary import IdVocabulary

    vocab = IdVocabulary(min_count=2, expiry_days=3)
    vocab.observe(["a", "b", "a", "c", "c"], day=10)  # a and c admitted on their 2nd sighting; b pending
    vocab.observe(["d", "d"], day=11)
    assert vocab.expire(today=14).tolist() == [1, 2]  # a, c last seen on day 10 < 14 - 3
    state = vocab.state()
    # rows: 0 default, 1 and 2 freed, 3 = d; b forgotten (pending since day 10)
    assert state.row_ids == ["", "", "", "d"] and state.pending_ids == []
    again = IdVocabulary.from_state(VocabularyState.from_payload(state.to_payload()))
    assert again.state() == state and again.lookup(["d", "a"]).tolist() == [3, 0]


# --- what does not fit ------------------------------------------------------------------


def test_an_unknown_schema_version_is_refused_naming_the_file_and_the_field(tmp_path):
    data = json.loads(full_model_manifest().to_json())
    data["format"] = 1
    with pytest.raises(ContractError, match=r"^models/x/manifest.json: field 'format' is 1: this freshtower reads full-model manifest schema version 2 only$"):
        FullModelManifest.from_json(json.dumps(data).encode(), "models/x/manifest.json")
    data = json.loads(full_release_manifest().to_json())
    data["format"] = 7
    with pytest.raises(ContractError, match="r/manifest.json: field 'format' is 7: this freshtower reads release manifest schema version 2"):
        release_manifest_from_json(json.dumps(data).encode(), "r/manifest.json")
    data = json.loads(embeddings_release_manifest().to_json())
    data["format"] = 1  # written before embeddings releases carried new items
    del data["new_items"]
    with pytest.raises(ContractError, match="r/manifest.json: field 'format' is 1: this freshtower reads release manifest schema version 2"):
        release_manifest_from_json(json.dumps(data).encode(), "r/manifest.json")
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": 1}, path)
    with pytest.raises(ContractError, match=f"{path}: field 'format' is 1: this freshtower reads online checkpoint schema version 2"):
        read_online_checkpoint(path)


def test_a_missing_field_is_named_with_its_file():
    data = json.loads(full_model_manifest().to_json())
    del data["data_end_ms"]
    with pytest.raises(ContractError, match=r"^m.json: field 'data_end_ms' is missing$"):
        FullModelManifest.from_json(json.dumps(data).encode(), "m.json")
    data = json.loads(embeddings_release_manifest().to_json())
    del data["checkpoints"]["checkpoint-1-of-2.pt"]["step"]
    with pytest.raises(ContractError, match=r"^r.json: field 'checkpoints.checkpoint-1-of-2.pt.step' is missing$"):
        release_manifest_from_json(json.dumps(data).encode(), "r.json")
    data = json.loads(embeddings_release_manifest().to_json())
    del data["new_items"]["count"]
    with pytest.raises(ContractError, match=r"^r.json: field 'new_items.count' is missing$"):
        release_manifest_from_json(json.dumps(data).encode(), "r.json")


def test_a_renamed_field_is_reported_as_missing_and_unknown():
    data = json.loads(full_release_manifest().to_json())
    data["newest_click_ms"] = data.pop("newest_click_event_time_ms")
    with pytest.raises(ContractError) as raised:
        release_manifest_from_json(json.dumps(data).encode(), "r.json")
    message = str(raised.value)
    assert message.startswith("r.json: field ") and "'newest_click_event_time_ms' is missing" in message
    assert "'newest_click_ms' is not part of this schema version" in message


def test_a_value_of_the_wrong_type_is_named_down_to_the_nested_field():
    data = json.loads(full_release_manifest().to_json())
    data["event_time"]["start_ms"] = "yesterday"
    with pytest.raises(ContractError, match=r"^r.json: field 'event_time.start_ms' is 'yesterday': input should be a valid integer"):
        release_manifest_from_json(json.dumps(data).encode(), "r.json")
    data = json.loads(full_release_manifest().to_json())
    data["kind"] = "delta"
    with pytest.raises(ContractError, match=r"^r.json: field 'kind' is 'delta': expected one of \['embeddings', 'full'\]$"):
        release_manifest_from_json(json.dumps(data).encode(), "r.json")
    with pytest.raises(ContractError, match=r"^r.json: not JSON"):
        release_manifest_from_json(b"{", "r.json")


def test_a_checkpoint_missing_a_field_or_not_a_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    write_online_checkpoint(path, online_checkpoint())
    raw = torch.load(path, weights_only=True)
    del raw["user_ids"]["row_ids"]
    torch.save(raw, path)
    with pytest.raises(ContractError, match=f"^{path}: field 'user_ids.row_ids' is missing$"):
        read_online_checkpoint(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(ContractError, match=f"^{path}: cannot load online checkpoint"):
        read_online_checkpoint(path)


def test_the_stores_report_a_bad_manifest_as_their_own_error_with_the_file_and_field(tmp_path):
    from freshtower.publisher.releases import ReleaseError, ReleaseStore
    from freshtower.trainer.artifacts import ArtifactError, list_full_models

    models = tmp_path / "models"
    (models / "2026-11-21.2").mkdir(parents=True)
    data = json.loads(full_model_manifest().to_json())
    data["format"] = 1  # a manifest written before the files carried their sizes
    (models / "2026-11-21.2" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"models/2026-11-21.2/manifest.json: field 'format' is 1"):
        list_full_models(models)

    releases = tmp_path / "releases"
    (releases / "00000003-full").mkdir(parents=True)
    data = json.loads(full_release_manifest().to_json())
    del data["dims"]["id_dim"]
    (releases / "00000003-full" / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ReleaseError, match=r"releases/00000003-full/manifest.json: field 'dims.id_dim' is missing"):
        ReleaseStore(releases).get("00000003-full")
