"""The training-batch format: TFRecord files of ``tf.train.Example``, one
record per sample, written by ``streams/`` and read by ``trainer/``.

A batch covers one event-time window (a minute by default) and lives at
``<batches_dir>/<YYYY-MM-DD>/<HHMMSS>.tfrecord`` (UTC window start), with a
JSON manifest ``<HHMMSS>.json`` beside it. The manifest is written last, so a
batch without one is incomplete and ignored. A window may have several
batches, one per part (``<HHMMSS>-p3.tfrecord``: the streams worker writes
one per input partition, so that workers sharing the partitions never
replace each other's files); readers take them all. Each writer also
records how far it has closed its windows, with or without records
(``<batches_dir>/closed-p<k>.json``): a window before that point gets no
more batches from it, which is how a reader knows a day is complete in
every partition, not only in the busiest one. Inside the file,
clicked samples (label 1) come first in event-time order, then the
shown-but-not-clicked samples (label 0); the manifest records the byte
length of the clicked section, so the retrieval trainers read only that
prefix.

Record features (keys of the Example):

================== ========== ================================================
key                type       meaning
================== ========== ================================================
user_id            bytes      raw user ID
item_id            bytes      raw item ID
label              int64      1 clicked, 0 shown but not clicked
event_time_ms      int64      click time (label 1) or impression time (label 0),
                              milliseconds since the Unix epoch, UTC
request_id         bytes      the recommendation request that showed the item
position           int64      slot of the item in that request (0-based)
user_cat/<name>    bytes      user categorical feature (absent: unknown)
user_num/<name>    float      user continuous feature (absent: 0.0)
item_cat/<name>    bytes      item categorical feature (absent: unknown)
hard_negative_ids  bytes list items a ranking stage dropped for this request
teacher_score      float      optional ranking-model score in [0, 1]
================== ========== ================================================

The reader checks every record's masked CRC32C (the ``tfrecord`` package
does not), so a corrupt or truncated file raises ``BatchFormatError`` naming
the file and the byte offset.

Modules, one concept each: ``schema`` (samples, columns, feature spec),
``encode`` (samples to Example bytes), ``framing`` (TFRecord frames and
their CRCs), ``layout`` (paths, manifests, writing and listing batches),
``decode`` (reading them back), ``example_parser`` (the vectorised wire
walk ``decode`` uses).
"""

from freshtower.core.batches.decode import decode_records, iter_batches, read_batch
from freshtower.core.batches.encode import RequestSharingEncoder, encode_sample
from freshtower.core.batches.framing import frame_record, iter_record_payloads, masked_crc32c, record_frames
from freshtower.core.batches.layout import (
    BatchManifest,
    BatchRef,
    batch_stem,
    list_batches,
    load_manifest,
    publish_batches,
    read_closed_through,
    window_stem,
    write_batch,
    write_closed_through,
)
from freshtower.core.batches.schema import FORMAT_VERSION, BatchFormatError, FeatureSpec, Sample, SampleColumns, empty_columns

__all__ = [
    "FORMAT_VERSION", "BatchFormatError", "BatchManifest", "BatchRef", "FeatureSpec", "RequestSharingEncoder", "Sample",
    "SampleColumns", "batch_stem", "decode_records", "empty_columns", "encode_sample", "frame_record", "iter_batches",
    "iter_record_payloads", "list_batches", "load_manifest", "masked_crc32c", "publish_batches", "read_batch", "read_closed_through",
    "record_frames", "window_stem", "write_batch", "write_closed_through",
]
