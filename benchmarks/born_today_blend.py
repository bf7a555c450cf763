"""Items born that day at 20,000 items, offline on a saved `freshtower experiment` seed
(``python benchmarks/born_today_blend.py <out>/simulator/seed-N``).

One saved seed: day-1 clicks scored by the day-0 full model (user vectors from the full model's rows: no
online user updates), against the catalogue + the items first seen that day before the click's hour, each new item
served (a) with its feature-mean vector, (b) rescaled feature-mean row, (c) the blend with its clickers before the hour.
Found = the clicked item in the top 50. Reports born-today clicks and older-item clicks (crowding)."""
import sys, numpy as np, torch
from pathlib import Path
from freshtower.trainer.artifacts import list_full_models, load_full_model
from freshtower.publisher.new_items import feature_mean_rows
from freshtower.core.batches import list_batches, read_batch, FeatureSpec, SampleColumns
from freshtower.core.settings import Settings
from freshtower.core.eventtime import DAY_MS, HOUR_MS, floor_ms
from freshtower.trainer.samplers import clicked_only
from freshtower.trainer.new_item_clicks import NewItemClicks, blend_with_clicks
root = Path(sys.argv[1]); K = 50
m = load_full_model(list_full_models(root / 'full/models/full')[0]).model; m.eval()
spec = FeatureSpec.from_model(Settings().model)
refs = list_batches(root / 'batches')
day1 = floor_ms(refs[0].window_start_ms, DAY_MS) + DAY_MS
cols = clicked_only(SampleColumns.concat([read_batch(r, spec) for r in refs if day1 <= r.window_start_ms < day1 + DAY_MS], spec))
o = np.argsort(cols.event_time_ms, kind="stable")
t = cols.event_time_ms[o]; items = [cols.item_ids[j] for j in o]; cats = [cols.item_categorical['category'][j] for j in o]
with torch.no_grad():
    old = m.catalogue_vectors().numpy()
    U = m.user_vectors(m.user_inputs([cols.user_ids[j] for j in o], {k: [cols.user_categorical[k][j] for j in o] for k in m.user_categorical},
                                     cols.user_numeric[o])).numpy()
    means = feature_mean_rows(m); table = m.item_tower.id_embedding.detach()
    rows = m.item_ids.lookup(m.catalogue.ids); own = np.flatnonzero(rows > 0); norms = {}
    for idx, vals in zip(own.tolist(), m.catalogue.features_of(own.tolist())):
        norms.setdefault(tuple(vals), []).append(float(table[rows[idx]].norm()))
    uc = sorted(set(cats)); inp = m.item_inputs([f"zz{c}" for c in uc], {"category": uc})
    mr = [means.get((c,), means[()]) for c in uc]
    base = dict(zip(uc, m.item_tower.from_id_vectors(torch.stack(mr), inp).numpy()))
    resc = dict(zip(uc, m.item_tower.from_id_vectors(torch.stack([r * np.mean(norms.get((c,), [1.0])) / float(r.norm()) for c, r in zip(uc, mr)]), inp).numpy()))
known = set(m.catalogue.ids); is_new = np.array([i not in known for i in items])
ids = list(dict.fromkeys(i for i, n in zip(items, is_new) if n)); pos = {i: n for n, i in enumerate(ids)}
first = np.full(len(ids), np.iinfo(np.int64).max); ncat = [None] * len(ids)
for j in np.flatnonzero(is_new):
    p = pos[items[j]]; first[p] = min(first[p], t[j]); ncat[p] = cats[j]
B = np.stack([base[c] for c in ncat]); R = np.stack([resc[c] for c in ncat])
oldpos = {i: n for n, i in enumerate(m.catalogue.ids)}
target = np.array([len(old) + pos[i] if n else oldpos.get(i, -1) for i, n in zip(items, is_new)])
variants = ["mean", "rescaled", "blend p3", "blend p10", "blend p30", "blend p100"]
hits = {v: [0, 0] for v in variants}; counts = [0, 0]; unseen = 0
S = np.zeros_like(B); cnt = np.zeros(len(ids), np.int64); ptr = 0
hours = (t // HOUR_MS) * HOUR_MS
for h in np.unique(hours):
    while ptr < len(t) and t[ptr] < h:
        if is_new[ptr]:
            S[pos[items[ptr]]] += U[ptr]; cnt[pos[items[ptr]]] += 1
        ptr += 1
    seen = first < h
    js = np.flatnonzero((hours == h) & (target >= 0))
    if len(js) == 0:
        continue
    clicks = NewItemClicks(0, S, cnt)
    news = {"mean": B, "rescaled": R, "blend p3": blend_with_clicks(B, clicks, 3.0), "blend p30": blend_with_clicks(B, clicks, 30.0), "blend p100": blend_with_clicks(B, clicks, 100.0),
            "blend p10": blend_with_clicks(B, clicks, 10.0)}
    os_ = U[js] @ old.T
    for j in js.tolist():
        kind = int(is_new[j])
        if kind and not seen[target[j] - len(old)]:
            unseen += 1
        counts[kind] += 1
    for v, V in news.items():
        ns = U[js] @ V.T; ns[:, ~seen] = -np.inf
        allsc = np.concatenate([os_, ns], axis=1)
        tsc = allsc[np.arange(len(js)), target[js]]
        rank = (allsc > tsc[:, None]).sum(1)
        found = (rank < K) & np.isfinite(tsc)
        for kind in (0, 1):
            hits[v][kind] += int(found[is_new[js] == bool(kind)].sum())
print(root.name, "clicks: older", counts[0], "born that day", counts[1], f"(of which item not yet clicked before the hour: {unseen})")
print("upper bound for anything learnt from earlier clicks: born-today clicks on items clicked before the hour", round(1 - unseen / counts[1], 4))
for v in variants:
    print(f"{v:10s} born-today found@50 {hits[v][1] / counts[1]:.4f}   older found@50 {hits[v][0] / counts[0]:.4f}   all clicks {(hits[v][0] + hits[v][1]) / (counts[0] + counts[1]):.4f}")
