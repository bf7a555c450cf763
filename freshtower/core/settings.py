"""The one typed configuration of freshtower.

Loaded once (``load_settings``) from, in rising priority: the defaults below
(the embedded local run), a TOML file, and ``FRESHTOWER_*`` environment
variables (nested fields with ``__``: ``FRESHTOWER_TRAINING__MODE=pairwise``).
Every component receives the resolved object; no module reads the
environment by itself. The resolved settings are stored in every model
artifact and release manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelConfig(_Section):
    """Shapes of the two towers. Changing any of these needs a full retrain."""

    id_dim: int = Field(64, ge=1, description="width of the user and item ID embeddings")
    categorical_dim: int = Field(16, ge=1, description="width of each categorical feature embedding")
    hidden_dims: tuple[int, ...] = Field((256,), description="hidden layer widths of each tower's MLP")
    output_dim: int = Field(64, ge=1, description="width of the L2-normalised tower output")
    user_categorical: tuple[str, ...] = ("age_bucket", "city", "device")
    user_numeric: tuple[str, ...] = ("activity_7d", "hour_sin", "hour_cos")
    item_categorical: tuple[str, ...] = ("category",)
    temperature: float = Field(0.05, gt=0, description="cosine / temperature gives the logits")


class VocabularyConfig(_Section):
    """Collisionless ID tables (Monolith-style frequency filter and expiry)."""

    user_min_count: int = Field(2, ge=1, description="sightings before a user ID gets its own row")
    item_min_count: int = Field(1, ge=1, description="sightings before an item ID gets its own row")
    expiry_days: int = Field(30, ge=1, description="an ID unseen this many days loses its row")
    pending_clicks: int = Field(
        100_000, ge=0, description="online: clicks of users not yet admitted, learnt once their row is (oldest dropped first)"
    )


class NegativesConfig(_Section):
    """Where negatives come from. Shown-but-not-clicked is never one of them."""

    easy_source: Literal["in_batch", "catalogue"] = "in_batch"
    num_negatives: int | None = Field(
        None, ge=1, description="negatives per positive when sampled explicitly; unset: 2 pointwise (1:2), 4 otherwise"
    )
    hard_fraction: float = Field(0.5, ge=0, le=1, description="share of hard (ranking-dropped) negatives")
    popularity_exponent: float = Field(0.75, description="catalogue sampler draws items with p ~ clicks**exponent")
    logq_correction: bool = Field(True, description="subtract log p_i from in-batch logits (training only)")
    remove_accidental_hits: bool = True


class PositiveResamplingConfig(_Section):
    """Down-sample popular positives, up-sample rare ones: multiplicity
    (p_ref / p_item) ** exponent, clipped to [min_multiplicity, max_multiplicity]."""

    enabled: bool = True
    exponent: float = Field(0.5, ge=0)
    reference_share: float | None = Field(
        None,
        gt=0,
        description="p_ref; unset: chosen per minibatch so its clicks' mean multiplicity is 1, at any catalogue size",
    )
    min_multiplicity: float = Field(0.1, gt=0, le=1)
    max_multiplicity: float = Field(3.0, ge=1)


class FrequencyConfig(_Section):
    """Streaming item-frequency estimator (Yi et al., RecSys 2019)."""

    buckets: int = Field(1 << 20, ge=16, description="size of each hashed array")
    hashes: int = Field(2, ge=1, description="independent hash arrays; the estimate takes the max gap")
    alpha: float = Field(0.01, gt=0, le=1, description="learning rate of the gap estimate")


class TrainingConfig(_Section):
    mode: Literal["pointwise", "pairwise", "listwise"] = "listwise"
    pairwise_loss: Literal["hinge", "logistic"] = "hinge"
    margin: float = Field(0.2, description="triplet hinge margin m (cosine units)")
    pairwise_sigma: float = Field(10.0, gt=0, description="triplet logistic sharpness")
    batch_size: int = Field(1024, ge=2)
    full_learning_rate: float = Field(3e-3, gt=0, description="Adam on dense layers, full trainer")
    full_embedding_learning_rate: float = Field(0.05, gt=0, description="row-sparse optimiser, full trainer")
    online_learning_rate: float = Field(0.05, gt=0, description="row-sparse optimiser, online trainer")
    online_optimizer: Literal["rowwise_adagrad", "sparse_adam"] = "rowwise_adagrad"
    holdout_seconds: float = Field(
        600.0, ge=0, description="the quality gate's data: the first this many seconds of the next day, which day D's model has not learnt"
    )
    accumulator_decay: float = Field(
        0.5, gt=0, le=1, description="row-wise Adagrad sums are multiplied by this at each daily warm start (1: never forget)"
    )
    shuffle_shards: int = Field(0, ge=0, description="external-shuffle shards; 0 picks from the record count")
    shuffle_shard_records: int = Field(2_000_000, ge=1000, description="records per shard when picking")
    checkpoint_every_seconds: float = Field(
        60.0, ge=0, description="online checkpoint period (wall clock); 0: after each window's batches (its partitions' files)"
    )
    online_poll_seconds: float = Field(
        10.0, gt=0, description="fallback: how often the following online trainer lists batch files when no announcement came"
    )
    online_lookback_seconds: float = Field(
        3600.0, ge=0, description="a batch file landing this late after newer ones is still trained (several streams workers)"
    )
    full_clock: Literal["wall", "event"] = Field("wall", description="daily full training on the wall clock, or on event time (replays)")
    full_delay_seconds: float = Field(
        900.0, ge=0, description="train day D once D+1 00:00 UTC plus this has passed (late events, lateness window)"
    )
    seed: int = 0
    threads: int = Field(0, ge=0, description="torch intra-op threads; 0: all cores, but one left to the online trainer's decoder")
    negatives: NegativesConfig = NegativesConfig()
    positive_resampling: PositiveResamplingConfig = PositiveResamplingConfig()

    @property
    def negatives_per_positive(self) -> int:
        """Explicit negatives per positive: the configured count, else 2 for
        pointwise (the design's 1:2 to 1:3; 2 keeps the 50/50 easy/hard mix
        exact) and 4 for pairwise and sampled listwise."""
        if self.negatives.num_negatives is not None:
            return self.negatives.num_negatives
        return 2 if self.mode == "pointwise" else 4


class EvaluationConfig(_Section):
    ks: tuple[int, ...] = (50, 100, 200)


class PrerankConfig(_Section):
    """The three-tower pre-ranker (COLD, Wang et al. 2020): user, item and
    cross towers and upper layers (``trainer/prerank_model.py``), its item
    cache at serving, and the encoding of its statistics features
    (``freshtower.core.statistics``). Changing a shape needs a full retrain;
    the encoding is stored with the model so that serving encodes as
    training did."""

    id_dim: int = Field(32, ge=1, description="width of the user and item ID embeddings")
    categorical_dim: int = Field(16, ge=1, description="width of each categorical feature embedding")
    # the user tower runs once per request and the item tower only on cache
    # misses, so both may be wide; the cross tower and the upper layers run
    # once per candidate and are kept narrow
    user_hidden_dims: tuple[int, ...] = Field((256,), description="user tower MLP (one inference per request)")
    item_hidden_dims: tuple[int, ...] = Field((128,), description="item tower MLP (outputs cached; inference on a miss)")
    tower_dim: int = Field(32, ge=1, description="width of the L2-normalised user and item tower outputs")
    cross_hidden_dims: tuple[int, ...] = Field((32,), description="cross tower MLP over the statistics features (per candidate)")
    cross_dim: int = Field(16, ge=1, description="width of the cross tower output")
    upper_hidden_dims: tuple[int, ...] = Field(
        (64, 32), min_length=1, description="upper layers over [user, item, cross] -> one logit (per candidate; most of the cost)"
    )
    category_feature: str = Field("category", description="item categorical feature that keys the (user, category) statistics")
    teacher_stage: str = Field("rank", description="rank-log stage whose candidates and scores a ranking sample holds")
    # --- daily training (trainer/prerank_full.py) and its quality gate ---
    batch_requests: int = Field(64, ge=1, description="requests (with all their candidates) per training minibatch")
    eval_top_k: int = Field(10, ge=1, description="quality: the ranker's top k ...")
    eval_keep: int = Field(100, ge=1, description="... recalled in the pre-ranker's top keep; NDCG@keep against the ranker's scores")
    max_quality_drop: float = Field(
        0.02, ge=0, description="the publisher refuses a pre-ranker whose holdout NDCG falls more than this below its parent's"
    )
    ctr_prior: float = Field(0.05, gt=0, lt=1, description="smoothed CTR = (clicks + prior * strength) / (impressions + strength)")
    ctr_prior_strength: float = Field(20.0, gt=0, description="pseudo-impressions behind ctr_prior")
    # --- online: the user ID rows learnt from the stream's ranking samples (trainer/prerank_online.py) ---
    online_user_rows: bool = Field(
        True, description="the online trainer also learns the pre-ranker's user ID rows; embeddings releases carry them"
    )
    online_learning_rate: float = Field(0.05, gt=0, description="row-wise Adagrad on the pre-ranker's user ID rows, online")
    embeddings_statistics: bool = Field(
        True, description="embeddings releases carry a fresh statistics snapshot (statistics.npz) while their full release has a pre-ranker"
    )
    max_candidates: int = Field(10_000, ge=1, description="most candidates one pre-ranking request may score")
    item_cache_size: int = Field(200_000, ge=1, description="item-tower outputs the service keeps (least recently used evicted)")


class DistillationConfig(_Section):
    """The ranker's logged scores (rank logs: ``scores`` in [0, 1]) as soft
    labels for the students: the pre-ranker and the two-tower retrieval
    model (``trainer/distillation.py``). The objective is
    ``click_weight * click_loss + distill_weight * distill_loss``."""

    mode: Literal["pointwise", "listwise"] = Field(
        "listwise", description="pointwise: BCE on each soft label; listwise: KL between softmaxes over a request's candidates"
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the listwise term (both sides)")
    teacher_space: Literal["logit", "score"] = Field(
        "logit", description="listwise teacher logits: logit(score) (the ranker's own logit) or the score itself"
    )
    score_epsilon: float = Field(1e-4, gt=0, lt=0.5, description="scores are clipped to [eps, 1 - eps] before the logit")
    click_weight: float = Field(1.0, ge=0, description="pre-ranker: weight of the click BCE")
    distill_weight: float = Field(1.0, ge=0, description="pre-ranker: weight of the distillation term")
    retrieval_weight: float = Field(
        0.0, ge=0, description="two-tower retrieval: weight of the distillation term beside its click loss; 0 is off"
    )
    retrieval_click_weight: float = Field(
        1.0, ge=0, description="two-tower retrieval: weight of its click loss; 0 replaces it by the distillation term"
    )
    retrieval_candidates: Literal["ranked", "shown"] = Field(
        "ranked",
        description="two-tower retrieval: a request's scored candidates from its ranking sample (shown ones where it has none), or shown only",
    )
    retrieval_mode: Literal["pointwise", "listwise"] = Field(
        "listwise", description="two-tower retrieval: the distillation term's form (over a request's shown items)"
    )

    @model_validator(mode="after")
    def _retrieval_learns_something(self):
        if self.retrieval_weight == 0 and self.retrieval_click_weight == 0:
            raise ValueError("distillation: retrieval_weight and retrieval_click_weight are both 0: the retrieval model learns nothing")
        return self


class StreamsConfig(_Section):
    window_seconds: float = Field(60.0, gt=0, description="batch window width; down to a few seconds")
    allowed_lateness_seconds: float = Field(10.0, ge=0)
    join_window_seconds: float = Field(1800.0, gt=0, description="click must come within this of its impression")
    max_future_seconds: float = Field(
        300.0, ge=0, description="events further ahead of their partition's stream (its latest accepted event) are rejected"
    )
    max_event_bytes: int = Field(256 * 1024, ge=1024)
    watermark_quantile: float = Field(
        0.9, gt=0, le=1, description="a partition's event time is this quantile of its recent events (a minority cannot move it)"
    )
    watermark_sample: int = Field(64, ge=1, description="recent events per topic partition that the watermark quantile is taken over")
    check_partitioner: bool = Field(
        True, description="events not on the partition murmur2(user_id) gives are rerouted (repartition) or dead-lettered"
    )
    repartition: bool = Field(
        True,
        description="reroute events on the wrong partition through '<app_id>-<topic>-repartition' to murmur2(user_id)'s "
        "(any producer's partitioner); off: dead-letter them wrong_partitioner",
    )
    dedup_horizon_seconds: float = Field(
        86_400.0, ge=0, description="written-out event IDs are remembered this long (event time); older copies are dead-lettered too_late"
    )
    max_lateness_seconds: float | None = Field(
        None, ge=0, description="impressions / rank logs further behind the watermark are dead-lettered (default: half the join window)"
    )
    partitions: int = Field(4, ge=1)
    # --- the streams worker (streams/app.py); see docs/streams.md ---
    max_id_length: int = Field(256, ge=1, description="longest accepted ID or feature value (characters)")
    max_items_per_event: int = Field(1000, ge=1, description="most items in one impression or rank log")
    app_id: str = Field("freshtower-streams", description="Faust app ID: consumer group and changelog-topic prefix")
    ranking_samples: bool = Field(
        True, description="write ranking samples and statistics rows beside each batch (requests with a rank log of prerank.teacher_stage)"
    )
    micro_batch_size: int = Field(2000, ge=1, description="most events the agent processes at once (a fetched batch is split)")
    commit_interval_seconds: float = Field(
        2.8, gt=0, description="Faust's periodic offset commit (the worker also commits after every delivered micro-batch)"
    )
    max_uncommitted_micro_batches: int = Field(
        4, ge=1, description="processed micro-batches not yet committed before the worker waits: bounds what a crash delivers again"
    )
    fetch_max_wait_ms: int = Field(
        1500, ge=1, le=60_000,
        description="longest a fetch of the input topics waits for data (Faust's 1,500 ms); the embedded broker holds a fetch "
        "much of this wait even when records are there, so it adds to every window's close (seconds mode: 100)",
    )
    idle_seconds: float = Field(10.0, gt=0, description="no event for this long (wall clock): the watermark follows the clock")
    idle_advance_rate: float = Field(
        1.0, ge=0, description="event-time seconds the watermark moves per idle wall second (1: real time; replays may use more; 0: never)"
    )
    web_port: int = Field(6066, ge=0, le=65535, description="worker HTTP endpoint (/metrics, /stats) on 127.0.0.1; 0 turns it off")
    log_every_seconds: float = Field(10.0, gt=0, description="period of the worker's throughput log line")
    event_loop: Literal["uvloop", "asyncio"] = Field("uvloop", description="uvloop roughly doubles Faust's per-event rate")


class TopicsConfig(_Section):
    impressions: str = "impressions"
    clicks: str = "clicks"
    rank_logs: str = "rank-logs"
    dead_letters: str = "dead-letters"
    training_batches: str = "training-batches"
    user_embeddings: str = "user-embeddings"
    online_checkpoints: str = Field("online-checkpoints", description="the online trainer announces each checkpoint here")
    releases: str = Field("releases", description="the publisher announces each activated release here")


class AnnouncementsConfig(_Section):
    """The hand-offs on announcement topics (freshtower/core/announcements.py);
    the poll intervals of each part remain as the fallback."""

    enabled: bool = Field(True, description="announce batches, checkpoints and releases, and wake on them; off: polling only")
    fetch_wait_ms: int = Field(50, ge=1, description="longest wait of a follower's fetch: bounds how late an announcement wakes a part")
    retry_seconds: float = Field(2.0, gt=0, description="a broker that does not answer is tried again after this")


class KafkaConfig(_Section):
    # Tansu's JoinGroup waits session_timeout/2 before answering; 6 s keeps
    # a join near 3 s without being fragile under load (docs/operations.md).
    session_timeout_ms: int = 6000
    heartbeat_interval_ms: int = 1000
    rebalance_timeout_ms: int = 6000  # how long a real Kafka waits for members to rejoin (no effect on Tansu)


class PublisherConfig(_Section):
    publish_interval_seconds: float = Field(1800.0, gt=0, description="embedding-delta release period")
    clock: Literal["wall", "event"] = "wall"
    keep_releases: int = Field(20, ge=2)
    max_recall_drop: float = Field(0.02, ge=0, description="refuse a full model whose Recall@50 falls more than this")
    min_gate_clicks: int = Field(
        200, ge=0, description="a holdout with fewer clicks is too small to refuse a full model on its Recall@50"
    )
    exact_index_below: int = Field(100_000, ge=1, description="catalogues smaller than this use exact search")
    # --- publisher/index_choice.py: above exact_index_below, each kind listed is built and the one that
    # meets index_recall_target at the lowest single-query p99 on the check users is released ---
    index_kinds: tuple[Literal["ivf", "hnsw"], ...] = Field(
        ("ivf", "hnsw"), min_length=1, description="index kinds the full release picks from (Faiss IVF-Flat, HNSW)"
    )
    index_recall_target: float = Field(
        0.95, ge=0, le=1, description="recall@100 vs exact search the chosen index must reach on the check users"
    )
    hnsw_max_items: int = Field(
        300_000, ge=1, description="above this many items HNSW is not a candidate unless it is the only kind (1M: ~90 s to build)"
    )
    hnsw_m: int = 32
    hnsw_ef_construction: int = 80
    hnsw_ef_search: int = Field(256, ge=1, description="largest HNSW efSearch tried; the release keeps the smallest that meets the target")
    ivf_lists: int | None = Field(None, ge=1, description="IVF lists; unset: the power of two nearest 2 * sqrt(items)")
    ivf_max_nprobe: int = Field(128, ge=1, description="largest IVF nprobe tried (1, 2, 4, ... up to it); the smallest meeting the target is kept")
    ivf_train_per_list: int = Field(40, ge=1, description="item vectors per list (a seeded sample) the IVF lists are trained on")
    ivf_train_iterations: int = Field(10, ge=1, description="k-means rounds that train the IVF lists")
    # --- publisher/publish.py ---
    poll_seconds: float = Field(10.0, gt=0, description="how often `freshtower publish` looks for a new full model or a due delta")
    index_check_queries: int = Field(
        200, ge=1, description="sampled users whose vectors check (and choose) the index against exact search"
    )
    min_index_recall: float = Field(0.9, ge=0, le=1, description="refuse a full release whose index recall@100 vs exact is below this")
    kafka_enabled: bool = Field(True, description="also send released user embeddings to topics.user_embeddings")
    topic_partitions: int = Field(4, ge=1, description="partitions of the compacted user-embeddings topic")
    topic_replication: int = Field(1, ge=1, description="replication factor of that topic (1 on the embedded broker)")
    new_item_vectors: bool = Field(
        True, description="embeddings releases carry the frozen item tower's vectors of items first seen since the full release"
    )
    new_item_id_row: Literal["feature_mean", "default"] = Field(
        "feature_mean", description="ID row a new item is embedded with: mean row of the items sharing its features, or the default row"
    )
    new_item_clicks: bool = Field(
        True,
        description="a new item's vector also moves toward the users who clicked it since the full release "
        "(the sum of their vectors, as the online trainer learnt them; trainer/new_item_clicks.py)",
    )
    new_item_click_prior: float = Field(
        10.0, gt=0, description="weight of a new item's feature vector against its clickers' vectors, in clicks"
    )
    # --- publisher/release_store.py: where releases live (the publisher writes, every replica reads) ---
    release_store: str | None = Field(
        None,
        pattern=r"^(file:///.*|s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?)$",
        description="file:///ABS/PATH or s3://BUCKET[/PREFIX]; unset: <data_dir>/releases",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto...); unset: AWS")
    s3_region: str = Field("us-east-1", description="S3 region (signing)")
    s3_access_key_id: str | None = Field(None, description="unset: boto3's own chain (AWS_ACCESS_KEY_ID, ~/.aws, instance role)")
    s3_secret_access_key: str | None = Field(None, description="with s3_access_key_id; never written to a manifest")
    release_cache_dir: Path | None = Field(None, description="local copy of releases read from S3; unset: <data_dir>/release-cache")


class ServiceConfig(_Section):
    host: str = "127.0.0.1"
    port: int = 8000
    admin_token: str | None = Field(None, description="bearer token for state-changing calls; unset refuses them")
    # --- publisher/service.py ---
    poll_seconds: float = Field(2.0, gt=0, description="how often the service reads the active-release pointer")
    max_k: int = Field(1000, ge=1, description="largest k a recall request may ask for")
    # a recall body at its limits (256-character user ID, 64 feature entries) is a few KB; this bounds
    # what one request can make the service buffer and parse, with room for long feature values
    max_request_bytes: int = Field(
        65536, ge=1024, description="largest request body in bytes; a larger one is refused with 413 before it is read"
    )
    max_prerank_request_bytes: int = Field(
        2 * 1024 * 1024, ge=1024, description="largest POST /v1/prerank or /v1/recommend body (10,000 candidate IDs are ~150 KB)"
    )
    max_recommend_recall: int = Field(10_000, ge=1, description="largest recall_k (N) a /v1/recommend request may ask for")
    max_recommend_keep: int = Field(1000, ge=1, description="largest keep (M) a /v1/recommend or /v1/prerank request may ask for")
    # one-row user towers gain nothing from more threads
    torch_threads: int = Field(1, ge=0, description="torch threads in `freshtower serve`; 0 keeps torch's default")
    hnsw_ef_search: int | None = Field(None, ge=1, description="override the efSearch stored in a release's HNSW index (speed vs recall)")
    # --- publisher/topic_follower.py ---
    follow_topic: bool = Field(
        False, description="between releases, apply newer user rows from topics.user_embeddings (on `kafka`) as they arrive"
    )


class Settings(BaseSettings):
    """Everything configurable, in one place."""

    model_config = SettingsConfigDict(
        env_prefix="FRESHTOWER_",
        env_nested_delimiter="__",
        frozen=True,
        extra="forbid",
    )

    data_dir: Path = Field(Path("freshtower-data"), description="batches, models, checkpoints, releases")
    kafka: str | None = Field(None, description="host:port of a real Kafka; unset starts the embedded broker")
    broker_port: int = Field(9092, ge=1, le=65535, description="port of the embedded broker on 127.0.0.1")
    durable_broker: bool = Field(
        False, description="the embedded broker stores topics and offsets in an S3 server (moto) started beside it, and survives a restart"
    )
    restart_parts: int = Field(
        0,
        ge=0,
        description="`freshtower run`: start a part that dies again, as a process manager would, up to this many times a part; "
        "0 ends the run at the first death",
    )
    model: ModelConfig = ModelConfig()
    vocabulary: VocabularyConfig = VocabularyConfig()
    frequency: FrequencyConfig = FrequencyConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    prerank: PrerankConfig = PrerankConfig()
    distillation: DistillationConfig = DistillationConfig()
    streams: StreamsConfig = StreamsConfig()
    topics: TopicsConfig = TopicsConfig()
    kafka_client: KafkaConfig = KafkaConfig()
    announcements: AnnouncementsConfig = AnnouncementsConfig()
    publisher: PublisherConfig = PublisherConfig()
    service: ServiceConfig = ServiceConfig()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _CONFIG_FILE.get("path")
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    @property
    def bootstrap_servers(self) -> str:
        """Where every Kafka client connects: the real Kafka if set, else the embedded broker."""
        return self.kafka or f"127.0.0.1:{self.broker_port}"

    # Paths derived from data_dir, so that one setting moves everything.
    @property
    def batches_dir(self) -> Path:
        return self.data_dir / "batches"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def online_dir(self) -> Path:
        return self.data_dir / "online"

    @property
    def releases_dir(self) -> Path:
        return self.data_dir / "releases"

    @property
    def scratch_dir(self) -> Path:
        """The full trainer's shuffle shards (removed after each run)."""
        return self.data_dir / "tmp"

    def as_record(self) -> dict:
        """JSON-ready resolved settings, for artifacts and manifests.

        The admin token is a secret and never leaves the process."""
        record = self.model_dump(mode="json")
        record["service"]["admin_token"] = None
        record["publisher"]["s3_secret_access_key"] = None
        return record


# pydantic-settings reads the TOML path from the class; a tiny holder lets
# load_settings choose the file per call without touching the environment.
_CONFIG_FILE: dict[str, Path | None] = {"path": None}


def load_settings(config_file: Path | str | None = None, **overrides) -> Settings:
    """Resolve the settings: overrides > FRESHTOWER_* env > TOML file > defaults."""
    path = Path(config_file) if config_file is not None else None
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    _CONFIG_FILE["path"] = path
    try:
        return Settings(**overrides)
    finally:
        _CONFIG_FILE["path"] = None


def settings_from_record(record: dict) -> Settings:
    """Rebuild settings stored in an artifact (ignores the current environment)."""
    return Settings.model_validate(record)


__all__ = ["Settings", "load_settings", "settings_from_record"]
