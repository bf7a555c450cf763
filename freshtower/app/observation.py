"""What ``freshtower run`` reads about its parts, from the disk (batches,
full models, the online checkpoint, the release store) and the parts' HTTP
endpoints (the streams worker's ``/stats``, the service's ``/v1/releases``
and ``/v1/recall``), into ``run_state``'s records. The rules and the text
are in ``run_state.py``; this is only the reading.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING

from freshtower.app.run_state import ActiveRelease, FullModelLine, RecallSample, Settled
from freshtower.core.settings import Settings

if TYPE_CHECKING:
    from freshtower.publisher.releases import Release

log = logging.getLogger(__name__)


def get_json(url: str, timeout: float = 1.0, body: dict | None = None) -> dict | None:
    """GET (or POST ``body``) ``url``; the JSON answer, ``{"status": code}``
    for an HTTP error, None when nothing answers."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        return {"status": error.code}
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Releases:
    full: int  # published by the publisher (activations), by kind
    embeddings: int
    active: ActiveRelease | None


def releases(settings: Settings) -> Releases:
    from freshtower.publisher.release_store import open_release_store
    from freshtower.publisher.releases import ReleaseError

    store = open_release_store(settings)
    counts = {"full": 0, "embeddings": 0}
    for entry in store.activations():
        if entry.get("by") == "publisher" and entry.get("kind") in counts:
            counts[entry["kind"]] += 1
    try:
        active = store.active()
    except ReleaseError:
        active = None  # the pointer is being replaced: look again next time
    return Releases(counts["full"], counts["embeddings"], None if active is None else active_release(active))


def active_release(release: Release) -> ActiveRelease:
    m = release.manifest
    return ActiveRelease(release.version, release.kind, release.model_version, m.newest_click_event_time_ms, m.checkpoint_event_time_ms)


def full_model_versions(settings: Settings) -> tuple[str, ...]:
    from freshtower.trainer.artifacts import full_models_dir, list_full_models

    return tuple(m.version for m in list_full_models(full_models_dir(settings)))


def settled(settings: Settings, last_event_ms: int, service_url: str) -> Settled:
    """The facts of the completion rule that matter once the replay has
    ended (``run_state.unfinished``); reads every batch manifest."""
    from freshtower.publisher.due import what_is_due
    from freshtower.publisher.release_store import open_release_store
    from freshtower.publisher.releases import ReleaseError
    from freshtower.trainer.artifacts import full_models_dir, list_full_models, refusal, servable_full_model
    from freshtower.trainer.schedule import day_of, days_due, event_clock_ms

    from freshtower.core.batches import list_batches

    s = settings
    refs = list_batches(s.batches_dir)
    models = full_models_dir(s)
    trained = {date.fromisoformat(m.day) for m in list_full_models(models)}
    now = event_clock_ms(s.batches_dir, refs)  # the daily trainer's event clock
    due = days_due({day_of(r.window_start_ms) for r in refs}, trained, now, int(s.training.full_delay_seconds * 1000))
    servable = servable_full_model(models)
    store = open_release_store(s)
    try:
        active = store.active()
    except ReleaseError:
        active = None
    bases, windows, checkpoints = _online_checkpoints(s)
    # What the publisher would do now, by its own rule.
    publisher = what_is_due(
        model_version=None if servable is None else servable.version,
        model_refused=None if servable is None else refusal(servable),
        activations=store.activations(),
        active=None if active is None else active.manifest,
        checkpoints=checkpoints,
        now_s=time.time(),
        config=s.publisher,
    )
    handled = servable is not None and not publisher.full.due
    st = s.streams
    return Settled(
        # the last impression's label-0 samples land join_window later, and
        # their window closes once the watermark passes its end plus the lateness
        streams_done_ms=int(last_event_ms + (st.join_window_seconds + st.window_seconds + st.allowed_lateness_seconds) * 1000),
        newest_batch_start_ms=refs[-1].window_start_ms if refs else None,
        days_due=tuple(d.isoformat() for d in due),
        servable_model=None if servable is None else servable.version,
        servable_model_handled=handled,
        checkpoint_base=bases.pop() if len(bases) == 1 else None,
        checkpoint_newest_window_ms=min(windows) if windows else None,
        rows_pending=publisher.embeddings.rows,
        rows_pending_due=publisher.embeddings.due,
        serving=(get_json(service_url + "/v1/releases") or {}).get("serving"),
    )


# --- for the summary ---------------------------------------------------------------------


def batch_figures(settings: Settings) -> tuple[int, dict[str, int], int, int]:
    """(batches, batches per day, records, clicked records)."""
    from freshtower.core.batches import list_batches

    refs = list_batches(settings.batches_dir)
    per_day: dict[str, int] = {}
    for ref in refs:
        day = ref.manifest_path.parent.name
        per_day[day] = per_day.get(day, 0) + 1
    return len(refs), per_day, sum(r.manifest.records for r in refs), sum(r.manifest.positives for r in refs)


def full_model_lines(settings: Settings) -> list[FullModelLine]:
    from freshtower.publisher.release_store import open_release_store
    from freshtower.trainer.artifacts import full_models_dir, list_full_models, refusal

    released = {e["model_version"]: e["version"] for e in open_release_store(settings).activations() if e.get("kind") == "full"}
    lines = []
    for m in list_full_models(full_models_dir(settings)):
        lines.append(FullModelLine(m.version, m.manifest.train_samples, m.manifest.holdout_recall(50), released.get(m.version), refusal(m)))
    return lines


def online_figures(settings: Settings) -> dict:
    """The online checkpoint's figures (batches, samples, re-bases, base)."""
    from dataclasses import asdict

    from freshtower.publisher.publish import online_checkpoints

    from freshtower.core.contracts.online_checkpoint import read_online_checkpoint

    figures: dict = {}
    for path in online_checkpoints(settings.online_dir).values():
        checkpoint = read_online_checkpoint(path)
        for key, value in asdict(checkpoint.stats).items():
            figures[key] = figures.get(key, 0) + value
        figures["base"] = checkpoint.base_version
    return figures


def recall_sample(service_url: str, user_id: str, features: dict, k: int = 10) -> RecallSample | None:
    answer = get_json(service_url + "/v1/recall", timeout=10, body={"user_id": user_id, "user_features": features, "k": k})
    if not answer or "items" not in answer:
        log.warning("sample recall request for %s failed: %s", user_id, answer)
        return None
    return RecallSample(
        user_id, [(i["item_id"], i["score"]) for i in answer["items"]], answer["cold_start"], answer["releases"], answer["freshness"]
    )


def quality_lines(settings: Settings, until_ms: int) -> list[str]:
    """Next-hour Recall@50 of what was served vs the daily model alone
    (``publisher/served_recall.py``), per followed day, over the hours that
    end by ``until_ms``."""
    import numpy as np
    import torch
    from freshtower.publisher.release_store import open_release_store
    from freshtower.publisher.served_recall import served_recall_by_hour

    from freshtower.core.batches import FeatureSpec, list_batches

    torch.set_num_threads(1)  # small matrices: a second thread only waits
    s = settings
    try:
        by_day = served_recall_by_hour(
            open_release_store(s), list_batches(s.batches_dir), FeatureSpec.from_model(s.model), until_ms=until_ms
        )
    except Exception as error:  # a figure for the summary, never a reason to fail the run
        log.exception("next-hour recall of the served releases")
        return [f"quality    not computed: {error}"]
    lines = []
    for day, rows in by_day.items():
        weights = np.array([r.users for r in rows], dtype=float)
        frozen = float(np.average([r.frozen for r in rows], weights=weights))
        served = float(np.average([r.served for r in rows], weights=weights))
        lines.append(
            f"quality    {day}: next-hour Recall@50 over {len(rows)} hours ({int(weights.sum()):,} user-hours): "
            f"daily model alone {frozen:.4f}, with the embeddings releases learnt before each hour {served:.4f}"
        )
    return lines


def prerank_lines(settings: Settings, service_url: str, user_id: str, features: dict, recall_k: int = 100, keep: int = 10) -> list[str]:
    """The served pre-ranker (from the active full release) and one
    ``/v1/recommend`` answer, as summary lines (none without a pre-ranker)."""
    import json

    from freshtower.publisher.release_store import open_release_store
    from freshtower.publisher.releases import ReleaseError

    try:
        store = open_release_store(settings)
        active = store.active()
        root = None if active is None else store.chain(active.version)[0]
    except (ReleaseError, OSError) as error:
        log.warning("reading the active release for the pre-ranker line: %s", error)
        return []
    if root is None or "prerank.json" not in root.manifest.files:
        return [f"prerank    none in the active release{'' if root is None else ' ' + root.version} (no ranking samples, or refused)"]
    note = json.loads(root.file("prerank.json").read_text())
    metrics = note.get("metrics", {})
    figures = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float) and ("ndcg" in k or "top" in k or "auc" in k))
    lines = [f"prerank    {note['model_version']} in release {root.version}: {note['items']:,} items; holdout {figures or 'n/a'}"]
    answer = get_json(
        service_url + "/v1/recommend", timeout=10, body={"user_id": user_id, "user_features": features, "recall_k": recall_k, "keep": keep}
    )
    if not answer or "items" not in answer:
        log.warning("sample recommend request for %s failed: %s", user_id, answer)
        return lines
    top = ", ".join(f"{i['item_id']} {i['score']:.2f}" for i in answer["items"][:5])
    lines.append(
        f"recommend  user {user_id}: {answer['candidates']} recalled -> {len(answer['items'])} pre-ranked, top {top}; "
        f"cache hits {answer['item_cache']['hits']}, unknown {len(answer['unknown_ids'])}; {_statistics_age(answer.get('freshness') or {})}"
    )
    return lines


def _statistics_age(freshness: dict) -> str:
    as_of, newest = freshness.get("statistics_as_of_ms"), freshness.get("newest_click_event_time_ms")
    if as_of is None:
        return "no statistics published"
    behind = f", {(newest - as_of) / 1000:,.0f} event-time s before the newest click learnt" if newest else ""
    when = datetime.fromtimestamp(as_of / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%MZ")
    return f"statistics as of {when}{behind}"


def _online_checkpoints(settings: Settings):
    """(base versions, newest windows, checkpoints by trainer name) of the
    online trainers' checkpoints now; a base of None: one being replaced."""
    from freshtower.publisher.publish import online_checkpoints

    from freshtower.core.contracts import ContractError
    from freshtower.core.contracts.online_checkpoint import read_online_checkpoint

    bases: set[str | None] = set()  # the full models the checkpoints follow
    windows, checkpoints = [], {}
    for name, path in online_checkpoints(settings.online_dir).items():
        try:
            checkpoint = read_online_checkpoint(path)
        except ContractError:
            bases.add(None)  # being replaced: look again next second
            continue
        bases.add(checkpoint.base_version)
        windows.append(checkpoint.newest_window_ms)
        checkpoints[name] = checkpoint
    return bases, windows, checkpoints
