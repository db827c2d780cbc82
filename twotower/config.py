"""All configuration, in one typed place.

Every component gets its own section; each field says its unit in its name and carries a
docstring. Values come from, lowest precedence first:

1. the defaults below,
2. a TOML file named by ``--config`` or ``TWOTOWER_CONFIG``,
3. environment variables ``TWOTOWER_<SECTION>__<FIELD>`` (e.g.
   ``TWOTOWER_TRAINER__STREAM_LR=0.05``; ``TWOTOWER_CONFIG``, ``TWOTOWER_CACHE_DIR`` and
   ``TWOTOWER_EXTRAS`` are not settings),
4. the two conventional shortcuts ``KAFKA_BOOTSTRAP`` and ``REDIS_URL``.

Unknown keys are rejected with an error naming them (kafka-python shows the cost of
silently ignoring a misspelt key).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """Raised for an unreadable config file, an unknown key or an invalid value."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


def _bootstrap_list(value: str) -> str:
    """Each of the comma-separated brokers is ``host:port`` (kafka-python's own error for a bad
    one names neither the setting nor the broker)."""
    for broker in value.split(","):
        host, _, port = broker.strip().rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"each broker must be host:port, got {broker.strip()!r}")
    return value


def _topic_prefix(value: str) -> str:
    """Characters Kafka allows in a topic name, with room left for the names after it."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{0,200}", value):
        raise ValueError(
            f"must be at most 200 of the characters Kafka allows in topic names (A-Z a-z 0-9 . _ -), got {value!r}"
        )
    return value


def _time_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Paris)") from None
    return value


def _cron(value: str) -> str:
    from apscheduler.triggers.cron import CronTrigger  # only when the value is set, not on every import

    try:
        CronTrigger.from_crontab(value, timezone="UTC")
    except ValueError as exc:
        raise ValueError(f"not a cron expression (minute hour day month weekday): {exc}") from None
    return value


class KafkaConfig(_Section):
    bootstrap: Annotated[str, AfterValidator(_bootstrap_list)] = "127.0.0.1:9092"
    """Comma-separated host:port list of the brokers."""
    topic_prefix: Annotated[str, AfterValidator(_topic_prefix)] = ""
    """Prepended to every topic name; tests use it to isolate themselves on a shared broker."""
    partitions: int = Field(default=3, ge=1)
    """Partitions for the topics this system creates."""
    events_retention_ms: int = Field(default=-1, ge=-1)
    """Retention of the events topic; -1 keeps everything. Kafka measures retention against
    record timestamps, which are event times here: a replay of old logs into a topic with a
    finite retention is deleted within minutes, so keep -1 (or a value longer than the age of
    any log you replay). The nightly retrain needs at least ``trainer.nightly_history_days`` + 2
    days (yesterday, the days it may read back, and today's until it runs)."""


class RedisConfig(_Section):
    url: str = "redis://127.0.0.1:6379/0"
    """Redis connection URL."""
    key_prefix: str = "tt"
    """Prepended to every key and channel; tests use one per test."""


class ModelConfig(_Section):
    dim: int = Field(default=64, ge=4)
    """Output embedding dimension of both towers."""
    id_dim: int = Field(default=32, ge=2)
    """Dimension of the ID-embedding rows."""
    hidden: int = Field(default=128, ge=4)
    """Hidden width of the tower MLPs."""
    n_categories: int = Field(default=64, ge=1)
    """Size of the item-category vocabulary: the first ``n_categories`` distinct categories get a
    row each, in order of arrival; later ones are hashed onto those rows (they share them). The
    table does not grow."""
    content_dim: int = Field(default=32, ge=0)
    """Length of the dense content-feature vector of an item (shorter vectors are zero-padded)."""
    profile_dim: int = Field(default=8, ge=0)
    """Length of the dense user-profile vector (shorter vectors are zero-padded)."""
    history_len: int = Field(default=20, ge=1)
    """How many recent interactions the user tower pools."""
    history_half_life_s: float = Field(default=86_400.0, gt=0)
    """Time-decay half-life of the history pooling, in seconds of event time."""
    recent_len: int = Field(default=3, ge=0)
    """``mean`` tower: also pool the plain mean of the newest ``recent_len`` history items, by order
    rather than time, as a second input beside the time-decayed mean (what the user did just now,
    whatever the log's clock). 0: the time-decayed mean only. Measured on MovieLens-100K (first
    40,000 events, prequential HR@10, streaming two-tower with ``user_row_dropout`` 0.5): 1 → 0.198,
    2 → 0.198, 3 → 0.202; without the view 0.188."""
    temperature: float = Field(default=0.05, gt=0)
    """Softmax temperature: score = cosine / temperature."""
    user_tower: Literal["mean", "mind"] = "mean"
    """``mean``: one vector from ID row + profile + time-decayed mean of the history (YouTubeDNN).
    ``mind``: MIND multi-interest tower (Li et al. 2019): capsule dynamic routing turns the history
    into up to ``interests`` vectors, served by one index query per interest, merged by max score.
    Default ``mean``: one index query per request, and the simulated users mostly have one taste
    area; choose ``mind`` when users have several distinct interests."""
    interests: int = Field(default=4, ge=1)
    """MIND: most interest capsules per user (a user with ``n`` history items gets
    ``max(1, min(interests, floor(log2 n)))``, the paper's dynamic interest number)."""
    routing_iterations: int = Field(default=3, ge=1)
    """MIND: iterations of behaviour-to-interest dynamic routing (the paper uses 3)."""
    mind_scoring: Literal["label_aware", "max"] = "max"
    """MIND training score. ``label_aware``: each click picks the interest nearest its item (hard
    label-aware attention, the paper's p → ∞) and every candidate is scored against that interest;
    ``max``: every candidate is scored by its nearest interest, exactly as serving merges. Default
    ``max``: measured on MovieLens-100K (temporal split, recall@20 of the next item) it scored 0.127
    against 0.110 for ``label_aware``, whose negatives never meet the user's other interests in
    training but do at serving. ``label_aware`` keeps the interests further apart (more diverse
    slates: on a two-category toy world both categories in the top 10 for 55 % of users vs 35 %)."""
    example_age: bool = False
    """Feed the user tower the example age (YouTubeDNN): ``log1p`` of (trainer's event-time clock -
    event time) in days while training, 0 at serving, so the model can learn freshness effects
    without them leaking into serving. The trainer's clock is the newest event time it has seen
    (streaming: about the batch's own time; nightly: at least the end of the day retrained).
    Default off: it changes the tower's input width (a new full version) and showed no gain offline."""
    context_time: bool = False
    """Feed the user tower the time of the request as context: sin/cos of the hour of day and of the
    day of week, in UTC, of the click's event time while training and of the request time at
    serving (4 inputs), so one user can get different vectors at different times (e.g. evening vs
    morning tastes). Learned in dense (nightly) steps only; streaming keeps it frozen like the rest
    of the towers. Default off: on MovieLens-100K (``evaluate replay``, nightly two-tower) it cost
    HR@10 0.145 → 0.129 — rating times say little about taste there; turn it on where the time
    of a request does."""
    context_dim: int = Field(default=4, ge=0)
    """Length of the caller-supplied dense context vector: an event's ``context["features"]`` when
    training, a request's ``context`` at serving (cut or zero-padded; a missing or malformed vector
    is all zeros). 0: no dense context. Weights saved before context features existed load with
    the context weights at zero (the old outputs exactly; the config then has these defaults)."""


def stored_model_config(data: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` saved with a checkpoint or snapshot.

    A field added since keeps its *old* behaviour where the saved config lacks it (the weights
    were shaped without it): ``recent_len`` 0. Fields whose default already is the old behaviour
    (the context inputs, whose weights load as zeros) need no entry here.
    """
    return ModelConfig.model_validate({"recent_len": 0, **data})


def _never_is_none(value: Any) -> Any:
    """``"never"``, ``"none"`` or ``""`` as ``None``: how the environment, whose values are text,
    says "no limit"."""
    if isinstance(value, str) and value.strip().lower() in ("", "none", "never"):
        return None
    return value


class TrainerConfig(_Section):
    state_dir: Path = Path("var/trainer")
    """Where checkpoints (weights + ID tables + Kafka offsets, written together) live."""
    group_id: str = "twotower-trainer"
    """Kafka consumer group of the streaming trainer."""
    batch_size: int = Field(default=256, ge=1)
    """Micro-batch size of the streaming trainer and batch size of the nightly retrain."""
    max_batch_wait_ms: int = Field(default=200, ge=1)
    """Longest a streaming micro-batch waits to fill before it is trained anyway."""
    stream_lr: float = Field(default=0.005, gt=0)
    """Row-wise Adagrad step size of the streaming ID-row updates. Small: measured on MovieLens-100K
    (prequential replay, HR@10) 0.02 made streaming worse than nightly-only by 3 points."""
    nightly_lr: float = Field(default=0.003, gt=0)
    """Adam step size of the nightly dense retrain."""
    stream_item_rows: bool = False
    """Streaming steps move item rows as well as user rows. Off: streaming tracks users (their rows)
    and item rows change only in the nightly retrain (a new item's vector comes from its content
    until then)."""
    nightly_from_base: bool = True
    """The nightly retrain starts its ID rows from the rows the previous nightly produced (the
    *nightly base*, ``nightly-base.pt`` in ``state_dir``), not from the streaming trainer's rows, which
    have learned the day once already; the hand-over then adds what streaming learned after the
    retrain's start (:mod:`trainer.handoff`). Each click is learned once by the nightly, streaming
    corrects within the day. Off: the nightly starts from the streaming rows (rows learn the day twice)."""
    nightly_row_lr: float = Field(default=0.02, gt=0)
    """Row-wise Adagrad step size of the ID rows in dense (nightly and bootstrap) steps; streaming
    steps use ``stream_lr``, so the streaming step can be small without slowing the nightly."""
    checkpoint_interval_s: float = Field(default=1.0, gt=0)
    """How often the streaming trainer checkpoints (and so how often a delta can be published): the
    parameter path's freshness waits up to this long for the next checkpoint. Default 1 s (was 5 s,
    which alone put the parameter path's p95 near 5 s); a checkpoint of the freshness bench's state
    (200 users, 1,000 items, 0.8 MB) takes about 40 ms, and ``checkpoint_max_share`` stretches the
    interval for states that take longer."""
    checkpoint_max_share: float = Field(default=0.25, gt=0, le=1)
    """Largest share of the streaming trainer's time spent checkpointing: after a checkpoint that
    took ``t`` seconds the next starts no sooner than ``t / checkpoint_max_share`` seconds after it
    began (at least ``checkpoint_interval_s``). With ``row_updates`` this spaces the row updates,
    and ``full_checkpoint_max_share`` the full checkpoints."""
    row_updates: bool = True
    """Between full checkpoints that are not due yet (``full_checkpoint_max_share``,
    ``full_checkpoint_interval_s``), write a *row update* every ``checkpoint_interval_s``: only the
    ID rows changed since the last write, which the publisher turns into a delta version
    (:func:`twotower.checkpoint.save_row_update`). Kafka offsets are committed at full checkpoints
    only (a restart resumes from the last full one and replays the rest). While a full checkpoint
    takes less than ``full_checkpoint_max_share * checkpoint_interval_s`` (small states) every
    checkpoint is full and nothing changes; at a million users (seconds per full checkpoint) row
    updates keep the parameter path at about ``checkpoint_interval_s``. Off: every checkpoint is
    full."""
    full_checkpoint_max_share: float = Field(default=0.05, gt=0, le=1)
    """With ``row_updates``: largest share of the trainer's time spent on full checkpoints (after
    one that took ``t`` seconds the next starts no sooner than ``t / full_checkpoint_max_share``
    seconds after it began; row updates fill the gap). A click that arrives while a full
    checkpoint is written waits for it, so this share of clicks sees it in its parameter path:
    at 1M users (2.5 s per full checkpoint) a share of 0.25 put the path's p95 at 4.3 s, fulls a
    minute apart at 1.4 s (``bench freshness --state-users 1000000``). States whose full checkpoint
    takes under ``full_checkpoint_max_share * checkpoint_interval_s`` (50 ms) are still written
    in full every time."""
    full_checkpoint_interval_s: float = Field(default=0.0, ge=0)
    """Least time between two full checkpoints when ``row_updates`` is on (0: only
    ``full_checkpoint_max_share`` spaces them). A longer one trades a longer replay after a restart
    for less checkpoint I/O."""
    out_of_order_ms: int = Field(default=2_000, ge=0)
    """Event-time allowance for out-of-order events when merging partitions."""
    admission_min_count: int = Field(default=1, ge=1)
    """An ID gets its own row once seen this many times."""
    admission_max_pending: int = Field(default=1_000_000, ge=1)
    """With ``admission_min_count`` above 1: how many IDs seen but not admitted yet each table
    remembers (per table; the least recently seen are forgotten beyond it)."""
    row_ttl_days: Annotated[float | None, BeforeValidator(_never_is_none)] = Field(default=None, gt=0)
    """Rows unseen for this many days of event time are expired: the row is freed and an expired
    item leaves the index (it returns with its next catalogue event or click). ``None`` (default):
    rows never expire by age. Expiry trades recall for memory, and what "stale" means depends on
    the catalogue: on Ciao (product reviews over ten years) 2,286 of the 5,741 evaluated clicks on
    known items went to items idle for more than a year (a 365-day TTL had removed them from the
    index); on MovieLens-100K a 30-day TTL cost half a point of HR@10. Set it where old items
    really go away."""
    seed: int = 0
    """Seed of the initial tower weights, of the negative sampler and of the nightly shuffle (new
    ID rows start at zero)."""
    nightly_margin_ms: int = Field(default=3_600_000, ge=0)
    """The nightly read starts and ends this far outside the day (by Kafka timestamp) to catch
    out-of-order events; each event's own time then decides whether it belongs to the day."""
    nightly_catch_up_days: int = Field(default=3, ge=1)
    """How many days back (yesterday included) a scheduled run retrains those after the newest
    date retrained so far: a day missed while the scheduler was down, or whose run failed or was
    stopped, is retrained by the next run, oldest first. 1: yesterday only. Needs the events
    topic's retention to cover them."""
    nightly_history_days: int = Field(default=7, ge=0)
    """How many days before the retrained day the nightly may read back from Kafka, for users who
    click on the day and whose earlier clicks the state no longer holds in full, as the user
    table's click count says. Beside a streaming trainer the state's history overflow keeps
    what the day's clicks pushed out, and the nightly reads nothing back while the state says it
    holds everything; it reads back after an upgrade from a checkpoint without the overflow, when
    run two or more days late, or on a forced rerun of a date already retrained. It reads one day
    at a time and stops as soon as it has found them all, or every such user has
    ``model.history_len`` clicks before the day; 0 reads none (their first examples of the day
    then see a shorter history than they had). Needs the events topic's retention to cover
    those days."""
    schedule_cron: Annotated[str, AfterValidator(_cron)] = "0 2 * * *"
    """Cron expression (minute hour day month weekday) of the nightly retrain."""
    schedule_timezone: Annotated[str, AfterValidator(_time_zone)] = "UTC"
    """Timezone of the cron expression and of the day boundaries of the nightly retrain."""
    loss: Literal["softmax", "bce", "pairwise_hinge", "pairwise_logistic"] = "softmax"
    """Retrieval objective over the same candidate set (the batch's clicked items + extra negatives).
    ``softmax``: listwise sampled softmax (Yi et al. 2019), the default, because it is what the
    logQ correction makes an unbiased estimate of the full softmax over the catalogue; ``bce``:
    pointwise logistic (positive term + mean negative term per click); ``pairwise_hinge`` /
    ``pairwise_logistic``: triplet losses over (click, negative) pairs (hinge with
    ``pairwise_margin``, or BPR's log-sigmoid)."""
    pairwise_margin: float = Field(default=0.1, ge=0)
    """Margin of ``pairwise_hinge`` in cosine units (the loss sees it divided by the temperature)."""
    logq_correction: Literal["inclusion", "expected_count", "none"] = "inclusion"
    """Sampling-bias correction (Yi et al. 2019): subtract log Q of each candidate from every logit,
    with click frequencies, the popularity sampler and hard-negative frequencies estimated from the
    stream. ``inclusion`` (default): Q = probability that the item is in the batch's deduplicated
    candidate set; ``expected_count``: Q = its expected number of draws (what the paper writes,
    equal for rare items, but it keeps penalising head items that are in every batch anyway: in a
    controlled simulation, ``tests/test_losses_unit.py``, it over-corrects: score-vs-log-popularity
    slope 1.37 where the truth is 1, inclusion 1.00, none 0.52); ``none``: no correction (only to
    measure its effect)."""
    negatives_popularity_ratio: float = Field(default=0.5, ge=0, le=1)
    """Share of the extra negatives (one per click in a batch, at least ``min_extra_negatives``) drawn
    from count^0.75; the rest are hard negatives (retrieved for the click's request but not shown)
    while the batch has enough, popularity samples otherwise. Default 0.5, mixed negative sampling
    (Yang et al. 2020): hard negatives sharpen the ranking among retrieved items, popularity samples keep the whole
    catalogue in view and make logQ well defined. Impressions without a click are never negatives."""
    min_extra_negatives: int = Field(default=64, ge=0)
    """Least number of extra negatives of a step (otherwise one per click): a streaming micro-batch
    of a few clicks still gets a softmax over enough of the catalogue."""
    hard_negative_requests: int = Field(default=10_000, ge=0)
    """How many recent requests' retrieved-but-not-shown items are remembered (LRU), to serve as hard
    negatives for clicks of the same request; 0 disables hard negatives."""
    history_gradient: bool = True
    """Back-propagate through the pooled history of the ``mean`` user tower (into the item tower
    and the history items' ID rows) in dense (nightly) steps, so each click also teaches the items
    that preceded it (:mod:`trainer.pooling`). Streaming steps keep history vectors constant (one
    user's click should not move twenty item rows). Off: history vectors are constants of the step."""
    user_row_dropout: float = Field(default=0.5, ge=0, lt=1)
    """Share of the clicks of a dense (nightly) step whose user ID row is zeroed, as a user without
    a row yet (new to the model, or not yet trained) is served: the tower then learns to place such
    users from their history and profile, not only from a row that memorised the day's clicks.
    Measured on MovieLens-100K (first 40,000 events, where most evaluated clicks come from users
    who arrived after the warm-up), prequential HR@10: nightly 0.177 → 0.184, streaming 0.181 →
    0.188 with 0.5."""
    ssl_weight: float = Field(default=0.0, ge=0)
    """Weight of the self-supervised contrastive loss on the item tower (Yao et al. 2021), added in
    dense (nightly) steps only. Default 0 (off): measured on MovieLens-100K (temporal split,
    recall@20 of the next item) weights 0.1 / 0.3 gave 0.122 / 0.128 against 0.129 without, and no
    measurable change on items with at most 20 training clicks; try it for catalogues with a long
    cold tail and rich content features."""
    ssl_temperature: float = Field(default=0.1, gt=0)
    """Temperature of the self-supervised InfoNCE loss."""
    ssl_dropout: float = Field(default=0.1, ge=0, lt=1)
    """Dropout on the content features of each self-supervised view (on top of the complementary
    masking of the feature groups ID row / category / content)."""


class PublisherConfig(_Section):
    poll_interval_s: float = Field(default=0.1, gt=0)
    """How often the publisher looks for a new trainer checkpoint (one ``stat`` of the file; the
    checkpoint is read only when it changed). Default 0.1 s: the wait is part of the parameter
    path's freshness (0.5 s before)."""
    full_every: int = Field(default=50, ge=1)
    """Publish a full snapshot after this many deltas even if the dense weights did not change
    (it compacts the delta chain a starting retriever applies), within ``full_build_max_share``."""
    full_build_max_share: float = Field(default=0.1, ge=0, le=1)
    """A full snapshot that only compacts the chain (``full_every``; the same dense weights) is
    built aside, on a thread of its own, while deltas go on being published; the deltas published
    meanwhile are carried over onto it, and retrievers switch once it is complete. Such a build is
    started only once the last full snapshot took at most this share of the time since it was
    published (0: no limit): at 1M items an HNSW build takes minutes of CPU, which the retrievers
    and the trainer on the same machine need too. Small catalogues are unaffected (a build of tens
    of ms allows one every second or so). New dense weights publish a full snapshot at once (its
    deltas could not apply to the old weights' items), whatever this says."""
    keep_versions: int = Field(default=5, ge=2)
    """How many full versions (with their deltas) are kept in Redis."""
    history_max_len: int = Field(default=100, ge=1)
    """Length cap of the per-user recent-history list in Redis."""
    group_id: str = "twotower-publisher"
    """Kafka consumer group of the serving-state writer (history, item details, new items)."""
    index_kind: str = Field(default="auto", pattern="^(auto|flat|hnsw|ivf|ivfpq)$")
    """Faiss index of full snapshots: ``auto`` is exact (flat) below ``exact_below`` items, HNSW
    above and IVF-PQ from ``ivfpq_above`` on; ``ivf`` builds faster but needs clustered data for
    good recall; ``ivfpq`` stores 16-byte codes instead of float vectors (d=64), for tens of
    millions of items, at some recall (reported at build time)."""
    exact_below: int = Field(default=100_000, ge=1)
    """With ``index_kind=auto``: catalogues smaller than this are searched exactly."""
    ivfpq_above: int = Field(default=10_000_000, ge=1)
    """With ``index_kind=auto``: catalogues of at least this many items get an IVF-PQ index."""
    hnsw_storage: str = Field(default="float16", pattern="^(float16|float32)$")
    """How an HNSW index stores the vectors it compares (publisher/index.py): ``float16`` halves
    their memory (1M items: a 408 MB index instead of 536 MB) and builds faster (199 s instead of
    296 s) at the same recall and search cost; its scores are within about 1e-3 of the cosine,
    and the retriever scores its hits again from the float32 vectors, so served scores are exact
    either way. ``float32``: the vectors as they are."""


class RetrieverConfig(_Section):
    host: str = "127.0.0.1"
    """Address the HTTP server binds."""
    port: int = Field(default=8000, ge=0, le=65535)
    """Port of the HTTP API (recommend, health, metrics)."""
    workers: int = Field(default=1, ge=1)
    """Worker processes."""
    default_k: int = Field(default=10, ge=1)
    """Items returned when the request does not say."""
    max_k: int = Field(default=1000, ge=1)
    """Largest k a request may ask for."""
    gil_switch_interval_ms: float = Field(default=0.5, gt=0)
    """Python's thread switch interval in each worker process (``sys.setswitchinterval``). While
    the snapshot watcher's thread rebuilds a state (seconds at 1M items) it competes with the
    request thread for the GIL, and a request waits up to this long at each of its hand-overs;
    Python's default is 5 ms. Measured while reloading a 1M-item snapshot: 190 → 50 waits of the
    request thread longer than 5 ms. Costs nothing while the watcher is idle."""
    reload_nice: int = Field(default=10, ge=0, le=19)
    """Niceness of each worker's snapshot watcher thread (Linux: per thread; 0: as the worker).
    The watcher reads, checks and builds new versions beside the request thread, most of it in
    C with the GIL released (a full 1M-item version: about a second of a core per worker); with
    a lower priority the kernel runs it on the time requests leave, and a request that wakes
    preempts it. Under a load that takes every core, reloads take longer and a worker may skip
    versions that arrive meanwhile (it always loads the newest). Measured at 1M items, open loop
    at 200/s while 10 versions (5 full) are made current: p90 4.0-5.6 ms, p99 21-320 ms in 4 runs,
    against p90 4.8-58 ms, p99 24-476 ms in 5 runs of the code before (no nice, and the hot-id
    hand-over the watcher no longer does) interleaved with them (docs/BENCHMARKS.md, session
    10); the closed loop's workers then applied 7-10 of the 20 worker swaps, against 18-20."""
    request_slice_us: int = Field(default=100, ge=0, le=100_000)
    """Time slice each worker asks the kernel for its request thread (the event loop), in
    microseconds; the snapshot watcher's thread, started afterwards, inherits it (Linux 6.12 and
    later: ``sched_setattr``, :mod:`retriever.thread_sched`; the kernel keeps it within
    100 µs-100 ms; 0: the kernel's default, 1.4 ms on two cores). Before the running thread's
    slice is used up, a thread that wakes preempts it only if it asked for a shorter slice; with
    the default, a request that arrives while Redis or another process has the core waits out
    the rest of that one's slice, at each of the loop's wakes. Shares of the CPU do not change (the watcher stays niced,
    ``reload_nice``). Measured at 1M items, open loop at 200/s during 10 swaps with full versions
    read from Redis (docs/BENCHMARKS.md, session 13): p99 8.6-12.8 ms in 5 of 6 runs (23.1 ms
    in the sixth, on a busier host) against 12.2-16.0 ms in 6 with the default, 4-11 requests
    over 20 ms against 15-36; with the watcher alone back on the default slice, one run of
    13.8 ms."""
    startup_wait_s: float = Field(default=60.0, ge=0)
    """How long a starting worker waits for its first snapshot load before it accepts connections,
    when a version is published already. Each worker of ``serve --workers N`` listens on its own
    socket (:mod:`retriever.workers`) only from then on: a client then never meets a worker still
    loading (503) beside one that is ready (``/ready`` of one worker says nothing of the others).
    After this long the worker accepts anyway and answers 503 until a load succeeds; with no
    version published yet it accepts at once. 0: never wait."""
    parts_dir: str | None = None
    """Host-local directory where the worker processes of a host share the big parts of a full
    version (item vectors, user rows, Faiss index; :mod:`retriever.parts`): the first worker to load a version
    writes them there, checked, and the others map them instead of reading and decoding Redis.
    ``None`` (default): a per-user directory under ``/dev/shm`` when the host has one; ``""``: none
    (every worker reads Redis itself). Measured at 1M items: 4.1 to 4.9 s CPU per worker per full
    reload → 3.0 s for the first, 1.1 to 1.3 s for the others."""
    loop_lag_check_ms: float = Field(default=50.0, ge=0)
    """How often each worker checks how late its event loop runs (:mod:`retriever.loop_lag`: the
    ``twotower_retriever_event_loop_lag_seconds`` histogram, the stalls every request in flight
    waits out); 0: no checks."""
    loop_lag_warn_ms: float = Field(default=100.0, gt=0)
    """A check at least this late is logged as a warning (at most one line per 10 s)."""
    gc_freeze: bool = True
    """Exempt what a worker holds once its app is built (modules, the app: about 240,000 objects)
    from Python's garbage collections (``gc.freeze``, :mod:`retriever.gc_pauses`), whose oldest
    generation otherwise walks them all, about 100 ms during which the worker answers nothing.
    Measured at 1M items (swap probe): without it one such collection in each of 2 runs (123
    and 137 ms), each time that run's slowest request (128 and 142 ms); with it none in 4 runs.
    Pauses are timed either way (``twotower_retriever_gc_pause_seconds``)."""
    redis_cache_mb: float = Field(default=64.0, ge=0)
    """Per worker, the users' stored histories and profiles it read from Redis, kept until Redis
    reports the key changed (server-assisted client-side caching, :mod:`retriever.tracked_cache`):
    a user asking again before their next click costs no Redis round trip. Invalidations arrive
    on the request connection, in order with the replies, so a click is seen by the next request
    as before. Least recently used entries go beyond this size; 0: read Redis on every request."""
    redis_cache_max_age_s: float = Field(default=60.0, gt=0)
    """Backstop: the longest a cached read is served, however quiet Redis is."""
    index_huge_pages: bool = True
    """Back the Faiss index with transparent huge pages (:mod:`retriever.malloc`; Linux with
    glibc): ``twotower serve`` starts again with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` and each
    worker reads the index into its own memory rather than mapping the shared file. Measured at 1M
    items (HNSW): search p50 about a third lower; three A/B pairs over HTTP gave 1.13 / 1.70 /
    1.40 → 0.91 / 0.97 / 1.38 ms retriever CPU per request. The cost is one copy of the index per
    worker (0.7 GB of huge pages at 1M items) and about 1 s more per worker to load a full
    version. ``false``: the index is mapped from the shared file (one copy per host). When
    ``parts_dir`` is on a tmpfs mounted with ``huge=always`` or ``huge=within_size``
    (:func:`retriever.parts.on_huge_page_tmpfs`; deploy/docker-compose.yml mounts one) the index
    is mapped from there either way: huge pages, one copy per host, and a worker loads a 1M-item
    full version in 0.15 s instead of 0.6-2.3 s (measured, docs/BENCHMARKS.md session 10)."""
    retain_freed_memory: bool = True
    """Each worker keeps the memory it frees (an old version's index) and reads the next full
    version into it (glibc tunables, :mod:`retriever.malloc`; Linux with glibc; ``twotower
    serve`` starts again with them): no fresh page faults at a reload, and nothing handed back to
    the kernel (on a virtual machine with free page reporting, to the host) in between. Measured
    at 1M items, 10 swaps under a 200/s open loop, five interleaved pairs: p99 6.9-12.8 ms
    against 24-364 ms, slowest request 19-52 ms against 141-482 ms (docs/BENCHMARKS.md session
    11). The cost: a worker's resident memory stays at its high-water mark (two indexes' worth
    during a swap: ~1.2 GB at 1M items) instead of falling between swaps. ``false``: glibc's
    defaults."""


class SimulatorConfig(_Section):
    n_users: int = Field(default=500, ge=1)
    """Simulated users."""
    n_items: int = Field(default=2_000, ge=1)
    """Items in the starting catalogue."""
    n_categories: int = Field(default=20, ge=1)
    """Item categories; each user's latent interest mixes a few of them."""
    latent_dim: int = Field(default=16, ge=2)
    """Dimension of the simulator's ground-truth latent space."""
    rate_per_s: float = Field(default=200.0, gt=0)
    """Recommendation requests (sessions) simulated per second."""
    slate_size: int = Field(default=10, ge=1)
    """Items shown per request."""
    zipf_a: float = Field(default=1.1, gt=0)
    """Zipf exponent of item popularity."""
    drift_per_s: float = Field(default=0.002, ge=0)
    """How fast user interests drift: radians per simulated second, along the great circle from a
    user's unit interest vector towards a private target (producers/world.py)."""
    new_item_every_s: float = Field(default=2.0, gt=0)
    """A new item arrives this often (simulated seconds)."""
    seed: int = 0
    """Seed of the ground truth and of every draw."""
    retriever_url: str = ""
    """Base URL of a retriever for closed-loop impressions; empty: popularity-random slates."""


class ObservabilityConfig(_Section):
    log_format: str = Field(default="json", pattern="^(json|text)$")
    """json for one JSON object per line, text for humans."""
    log_level: str = Field(default="INFO", pattern="(?i)^(DEBUG|INFO|WARNING|ERROR|CRITICAL)$")
    """Root log level."""
    metrics_port: int = Field(default=0, ge=0, le=65535)
    """Port of /metrics and /health for daemons without their own HTTP server; 0 disables."""


class Config(_Section):
    """The whole system's configuration."""

    kafka: KafkaConfig = KafkaConfig()
    redis: RedisConfig = RedisConfig()
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    publisher: PublisherConfig = PublisherConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    simulator: SimulatorConfig = SimulatorConfig()
    observability: ObservabilityConfig = ObservabilityConfig()

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.retriever.default_k > self.retriever.max_k:
            raise ValueError("retriever.default_k must not exceed retriever.max_k")
        if self.publisher.history_max_len < self.model.history_len:
            raise ValueError(
                "publisher.history_max_len must be at least model.history_len: the retriever pools the newest "
                "model.history_len items of the history the publisher keeps, as the trainer does"
            )
        if self.simulator.retriever_url and 2 * self.simulator.slate_size > self.retriever.max_k:
            raise ValueError(
                "2 x simulator.slate_size must not exceed retriever.max_k: the simulator asks the retriever for "
                "twice its slate (the rest are its requests' hard negatives)"
            )
        return self

    def with_overrides(self, overrides: Mapping[str, Mapping[str, Any]]) -> Config:
        """A copy with some fields of some sections replaced (validated like a file would be)."""
        data = self.model_dump()
        for section, values in overrides.items():
            if section not in data:
                raise ConfigError(f"unknown config section {section!r}")
            data[section].update(values)
        return _validate(data, "overrides")


ENV_PREFIX = "TWOTOWER_"
NOT_SETTINGS = frozenset({"TWOTOWER_CONFIG", "TWOTOWER_CACHE_DIR", "TWOTOWER_EXTRAS"})
"""``TWOTOWER_`` variables that are not settings: the config file's path, and the launcher's
cache directory and extras (``scripts/venv.sh``, :func:`twotower.infra.cache_dir`)."""


def _deep_update(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        elif isinstance(value, Mapping) and key in base:  # e.g. ``kafka = "x"`` in the file
            raise ConfigError(f"{key} must be a table of settings, got {type(base[key]).__name__}")
        else:
            base[key] = value


def _env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in NOT_SETTINGS:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2 or not all(parts):
            raise ConfigError(f"environment variable {name} must look like {ENV_PREFIX}<SECTION>__<FIELD>")
        layer.setdefault(parts[0], {})[parts[1]] = value
    if env.get("KAFKA_BOOTSTRAP"):
        layer.setdefault("kafka", {})["bootstrap"] = env["KAFKA_BOOTSTRAP"]
    if env.get("REDIS_URL"):
        layer.setdefault("redis", {})["url"] = env["REDIS_URL"]
    return layer


def _validate(data: Mapping[str, Any], source: str) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigError(f"invalid configuration ({source}): {problems}") from None


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Build the configuration from defaults, an optional TOML file and the environment.

    Args:
        path: TOML file; ``None`` falls back to ``$TWOTOWER_CONFIG`` and then to no file.
        env: the environment to read; ``None`` means ``os.environ``.

    Raises:
        ConfigError: the file cannot be read, or a key or value is invalid.
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = path or env.get(ENV_PREFIX + "CONFIG") or None
    if path is not None:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from None
    _deep_update(data, _env_layer(env))
    return _validate(data, str(path) if path else "defaults and environment")
