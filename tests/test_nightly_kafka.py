"""The nightly retrain against the real broker: counting the day once, determinism, handoff."""

from __future__ import annotations

import copy
import datetime as dt
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from trainer import handoff, nightly
from trainer.days import day_bounds_ms
from trainer.nightly import run_nightly
from trainer.state import TrainerState
from trainer.stream import NIGHTLY_COUNTED, StreamTrainer
from twotower import checkpoint
from twotower.config import Config
from twotower.events import CLICK, IMPRESSION, CatalogItem, Interaction
from twotower.kafka_io import Topics, ensure_topics, make_producer, send_record

pytestmark = pytest.mark.integration

DAY = dt.date(2024, 3, 10)
SMALL_MODEL = {"dim": 8, "id_dim": 4, "hidden": 16, "content_dim": 4, "profile_dim": 2, "history_len": 5}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _small(cfg: Config, **trainer: Any) -> Config:
    return cfg.with_overrides(
        {
            "model": SMALL_MODEL,
            "trainer": {"checkpoint_interval_s": 0.3, "batch_size": 16, "max_batch_wait_ms": 50, **trainer},
        }
    )


def _clicks(tag: str, n: int, t0_ms: int, step_ms: int = 60_000, users: int = 8, items: int = 12) -> list[Interaction]:
    return [
        Interaction(
            f"{tag}{k}", f"{tag}r{k}", f"u{k % users}", f"i{(k * 5) % items}", CLICK, 0, t0_ms + k * step_ms,
            {"features": [float(k % 3)]},
        )
        for k in range(n)
    ]  # fmt: skip


def _impressions(clicks: list[Interaction], items: int = 12) -> list[Interaction]:
    """One impression per click's request, listing two retrieved-but-not-shown items (hard negatives)."""
    out = []
    for c in clicks:
        k = int(c.item_id[1:])
        retrieved = [f"i{(k + 1) % items}", f"i{(k + 2) % items}"]
        context = {"retrieved": retrieved}
        out.append(
            Interaction(c.event_id + "i", c.request_id, c.user_id, c.item_id, IMPRESSION, 0, c.ts_ms - 1, context)
        )
    return out


def _produce(cfg: Config, records: list) -> None:
    topics = ensure_topics(cfg.kafka)
    producer = make_producer(cfg.kafka)
    for record in records:
        send_record(producer, topics.catalog if isinstance(record, CatalogItem) else topics.events, record)
    producer.flush()
    producer.close()


def _catalog(items: int = 12) -> list[CatalogItem]:
    return [CatalogItem(f"i{i}", f"c{i % 3}", [float(i % 3 == j) for j in range(3)], 0) for i in range(items)]


def _expected_histories(clicks: list[Interaction], length: int) -> dict[str, list[tuple[str, int]]]:
    out: dict[str, list[tuple[str, int]]] = {}
    for c in sorted(clicks, key=lambda c: c.ts_ms):
        out.setdefault(c.user_id, []).append((c.item_id, c.ts_ms))
    return {u: h[-length:] for u, h in out.items()}


def _stream_until_idle(cfg: Config) -> None:
    """Run a streaming trainer in this thread until it has seen nothing for 2 s."""
    trainer = StreamTrainer(cfg, max_idle_s=2.0)
    trainer.startup()
    try:
        trainer.main_loop()
    finally:
        trainer.shutdown()


def _counts(ckpt: checkpoint.Checkpoint) -> tuple[int, int]:
    return int(ckpt.users.count.sum()), int(ckpt.items.count.sum())


def _learned(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records how many examples each learning step of any TrainerState trains on."""
    sizes: list[int] = []
    original = TrainerState.learn

    def spy(self: TrainerState, examples: Any, dense: bool, row_lr: float | None = None) -> Any:
        sizes.append(len(examples))
        return original(self, examples, dense, row_lr)

    monkeypatch.setattr(TrainerState, "learn", spy)
    return sizes


def _example_histories(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, int]]]:
    """Records the history of each example the nightly builds, in the order it builds them."""
    seen: list[list[tuple[str, int]]] = []
    build = nightly.build_examples

    def spy(state: TrainerState, clicks: list[Interaction], day_start_ms: int, earlier: Any = ()) -> list:
        out = build(state, clicks, day_start_ms, earlier)
        seen.extend(h for _, h in out)
        return out

    monkeypatch.setattr(nightly, "build_examples", spy)
    return seen


# --- counting the day's clicks once -------------------------------------------------------------------


def test_nightly_owning_the_state_counts_each_day_once(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    day1 = _clicks("a", 40, start + 1_000)
    day2 = _clicks("b", 30, start + 86_400_000 + 1_000)
    _produce(cfg, _catalog() + day1 + day2)
    learned = _learned(monkeypatch)

    assert run_nightly(cfg, DAY, progress=False).status == "trained"
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None
    assert _counts(ckpt) == (40, 40)  # counted once, by the nightly itself
    assert ckpt.histories.as_dict() == _expected_histories(day1, 5)  # tomorrow starts from today's histories
    assert ckpt.event_time_ms == day1[-1].ts_ms
    assert sum(learned) == 40  # learned once (the retrain), not again when counting

    # a forced rerun retrains the date but does not count it again
    assert run_nightly(cfg, DAY, force=True, progress=False).status == "trained"
    again = checkpoint.load(cfg.trainer.state_dir)
    assert _counts(again) == (40, 40) and again.histories.as_dict() == ckpt.histories.as_dict()

    # the next day's examples start from the histories of the day before
    seen = _example_histories(monkeypatch)
    assert run_nightly(cfg, DAY + dt.timedelta(days=1), progress=False).examples == 30
    assert seen[0] == _expected_histories(day1, 5)[day2[0].user_id]
    later = checkpoint.load(cfg.trainer.state_dir)
    assert _counts(later) == (70, 70)
    assert later.histories.as_dict() == _expected_histories(day1 + day2, 5)


def test_nightly_does_not_recount_what_a_stopped_streaming_trainer_applied(config: Config) -> None:
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    clicks = _clicks("a", 40, start + 1_000)
    _produce(cfg, _catalog() + clicks[:25])
    _stream_until_idle(cfg)
    partial = checkpoint.load(cfg.trainer.state_dir)
    assert partial is not None and _counts(partial) == (25, 25)
    _produce(cfg, clicks[25:])  # arrives after the streaming trainer stopped

    assert run_nightly(cfg, DAY, progress=False).examples == 40
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert _counts(ckpt) == (40, 40)
    assert ckpt.histories.as_dict() == _expected_histories(clicks, 5)


def test_nightly_owning_the_state_first_merges_a_handoff_left_waiting(config: Config) -> None:
    """The nightly of DAY handed over to a streaming trainer that stopped before merging it; the
    nightly of the next day, owning the state, merges it first and retrains on top of it."""
    cfg = _small(config)
    state_dir = Path(cfg.trainer.state_dir)
    start, _ = day_bounds_ms(DAY, "UTC")
    _produce(cfg, _catalog() + _clicks("b", 30, start + 86_400_000 + 1_000))
    state = TrainerState(cfg.model, cfg.trainer)
    checkpoint.save(state_dir, state.to_checkpoint({}))
    retrained = copy.deepcopy(state)
    with torch.no_grad():
        retrained.model.item.category.weight.fill_(0.5)
    handoff.write(state_dir, DAY.isoformat(), state, retrained)

    assert run_nightly(cfg, DAY + dt.timedelta(days=1), progress=False).status == "trained"
    ckpt = checkpoint.load(state_dir)
    assert ckpt is not None
    assert ckpt.extra["nightly_done"] == [DAY.isoformat(), (DAY + dt.timedelta(days=1)).isoformat()]
    assert ckpt.dense_version == 2  # the merged retrain, then this one
    assert not (state_dir / handoff.FILENAME).exists()


def _days_read_back(monkeypatch: pytest.MonkeyPatch) -> list[dt.date]:
    """Records the days the nightly reads back (:func:`trainer.nightly.load_day`)."""
    days: list[dt.date] = []
    load = nightly.load_day

    def spy(cfg: Config, topics: Any, date: dt.date) -> list[Interaction]:
        days.append(date)
        return load(cfg, topics, date)

    monkeypatch.setattr(nightly, "load_day", spy)
    return days


def _as_written_before_the_overflow(state_dir: Path) -> None:
    """Rewrite the checkpoint as the code before the history overflow wrote it."""
    ckpt = checkpoint.load(state_dir)
    assert ckpt is not None and len(ckpt.history_overflow)
    data = checkpoint.encode(ckpt)
    del data["history_overflow"], data["extra"]["overflow_since_ms"]
    torch.save(data, checkpoint.path_in(state_dir))


def test_nightly_completes_the_pre_day_history_a_busy_day_pushed_out(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streaming trainer saw the day before and the day: a user's history (5 long) holds only
    the day's last clicks. The nightly's first example of the day must still see the 5 clicks
    before the day: the checkpoint's history overflow holds them, and no day is read back."""
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    before = _clicks("p", 7, start - 8 * 3_600_000, users=1)  # the day before: u0's 7 clicks
    during = _clicks("d", 9, start + 1_000, users=1)  # the day: 9 more, pushing them all out
    _produce(cfg, _catalog() + before + during)
    _stream_until_idle(cfg)
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None and _counts(ckpt) == (16, 16)
    assert all(ts >= start for _, ts in ckpt.histories.as_dict()["u0"])
    assert ckpt.history_overflow.as_dict()["u0"] == _expected_histories(before, 5)["u0"]
    seen = _example_histories(monkeypatch)
    read_back = _days_read_back(monkeypatch)
    assert run_nightly(cfg, DAY, progress=False).examples == 9
    assert seen[0] == _expected_histories(before, 5)["u0"]
    assert seen[3] == _expected_histories(before + during[:3], 5)["u0"]
    assert read_back == []


def test_nightly_reads_back_as_many_days_as_the_lost_history_spans(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, but u0's 5 clicks before the day fell on two days: 3 two days before, 2 the day
    before, and the checkpoint was written before the history overflow (an upgrade): the nightly
    reads back both days (``trainer.nightly_history_days``)."""
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    two_back = _clicks("q", 3, start - 30 * 3_600_000, users=1)
    one_back = _clicks("p", 2, start - 8 * 3_600_000, users=1)
    during = _clicks("d", 9, start + 1_000, users=1)
    _produce(cfg, _catalog() + two_back + one_back + during)
    _stream_until_idle(cfg)
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None and all(ts >= start for _, ts in ckpt.histories.as_dict()["u0"])
    _as_written_before_the_overflow(Path(cfg.trainer.state_dir))
    seen = _example_histories(monkeypatch)
    read_back = _days_read_back(monkeypatch)
    assert run_nightly(cfg, DAY, progress=False).examples == 9
    assert seen[0] == _expected_histories(two_back + one_back, 5)["u0"]
    assert len(seen[0]) == 5
    assert read_back == [DAY - dt.timedelta(days=1), DAY - dt.timedelta(days=2)]


def test_streaming_trainer_started_after_nightly_only_days_does_not_count_them_again(config: Config) -> None:
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    day1 = _clicks("a", 40, start + 1_000)
    day2 = _clicks("b", 30, start + 86_400_000 + 1_000)  # today: no nightly yet
    _produce(cfg, _catalog() + _impressions(day1) + day1 + day2)
    assert run_nightly(cfg, DAY, progress=False).status == "trained"
    ckpt = checkpoint.load(cfg.trainer.state_dir)
    assert ckpt is not None and [r[:2] for r in ckpt.extra[NIGHTLY_COUNTED]] == [list(day_bounds_ms(DAY, "UTC"))]
    assert _counts(ckpt) == (40, 40)
    hard = dict(ckpt.hard_negatives.counts)
    late = _clicks("late", 1, start + 40 * 60_000, users=1)  # yesterday's last, after the nightly's read
    _produce(cfg, late)

    # a streaming trainer starts on this state: it replays the topic from the checkpoint's offsets
    # (the beginning), skips yesterday's interactions the nightly read (it counted them) and counts
    # today's and the late one
    _stream_until_idle(cfg)
    final = checkpoint.load(cfg.trainer.state_dir)
    assert _counts(final) == (71, 71)
    assert final.histories.as_dict() == _expected_histories(day1 + late + day2, 5)
    assert final.hard_negatives.counts == hard  # yesterday's impressions not observed twice
    assert final.extra[NIGHTLY_COUNTED] == []  # its offsets are behind every partition's: not read again
    assert sum(final.offsets.values()) >= 40 + 40 + 30  # every record of the topic is behind it


# --- determinism ------------------------------------------------------------------------------------


def _assert_same(a: checkpoint.Checkpoint, b: checkpoint.Checkpoint) -> None:
    assert a.dense.keys() == b.dense.keys()
    for name, value in a.dense.items():
        assert torch.equal(value, b.dense[name]), name
    for table in ("users", "items"):
        ta, tb = getattr(a, table), getattr(b, table)
        assert ta.ids == tb.ids
        for part in ("emb", "accum", "count", "last_seen_ms", "updated_seq"):
            assert torch.equal(getattr(ta, part), getattr(tb, part)), f"{table}.{part}"
    assert a.histories.as_dict() == b.histories.as_dict() and a.seq == b.seq and a.dense_version == b.dense_version
    sa, sb = a.extra["dense_optimizer"]["state"], b.extra["dense_optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for key in sa:
        assert all(torch.equal(sa[key][k], sb[key][k]) for k in ("exp_avg", "exp_avg_sq")), key
    assert torch.equal(a.extra["generator"], b.extra["generator"])
    assert a.hard_negatives.counts == b.hard_negatives.counts


def test_nightly_is_deterministic_for_a_seed(config: Config, tmp_path: Path) -> None:
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    before = _clicks("a", 30, start - 86_400_000 + 1_000)
    day = _clicks("b", 50, start + 1_000)
    _produce(cfg, _catalog() + before + _impressions(day) + day)
    # the common starting checkpoint: the day before, retrained
    assert run_nightly(cfg, DAY - dt.timedelta(days=1), progress=False).status == "trained"
    runs = {}
    for name, seed in (("first", 0), ("second", 0), ("other_seed", 1)):
        state_dir = tmp_path / name
        shutil.copytree(cfg.trainer.state_dir, state_dir)
        run_cfg = cfg.with_overrides({"trainer": {"state_dir": state_dir, "seed": seed}})
        result = run_nightly(run_cfg, DAY, progress=False)
        assert result.status == "trained" and result.examples == 50
        runs[name] = checkpoint.load(state_dir)
    _assert_same(runs["first"], runs["second"])  # bit-identical weights, rows, optimizer and histories
    differ = [k for k, v in runs["first"].dense.items() if not torch.equal(v, runs["other_seed"].dense[k])]
    assert differ  # another seed: another shuffle and other negatives
    assert not torch.equal(runs["first"].users.emb, runs["other_seed"].users.emb)
    assert runs["first"].histories.as_dict() == runs["other_seed"].histories.as_dict()  # the same clicks, counted alike


# --- handoff into a running streaming trainer ------------------------------------------------------------


def _wait(predicate: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _rows(table: Any) -> dict[str, torch.Tensor]:
    return {key: table.emb[row].clone() for key, row in table.index.items()}


def test_nightly_hands_over_into_a_running_streaming_trainer(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _small(config)
    start, _ = day_bounds_ms(DAY, "UTC")
    yesterday = _clicks("a", 40, start + 1_000)
    meanwhile = _clicks("b", 12, start + 86_400_000 + 1_000, users=4)  # today, during the retrain
    _produce(cfg, _catalog() + yesterday)

    trainer = StreamTrainer(cfg)
    trainer.startup()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            trainer.main_loop()
        except BaseException as exc:  # surfaced by the test thread
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        state = trainer.state
        assert state is not None
        _wait(lambda: int(state.items.count.sum()) == 40, "the streaming trainer to count yesterday")
        _wait(
            lambda: (c := checkpoint.load(cfg.trainer.state_dir)) is not None and _counts(c) == (40, 40), "a checkpoint"
        )
        dense_before = {k: v.clone() for k, v in state.model.state_dict().items()}
        start_ckpt = checkpoint.load(cfg.trainer.state_dir)  # what the nightly will start from
        assert start_ckpt is not None
        version_before = state.dense_version

        # While the nightly retrains, the streaming trainer keeps learning today's clicks.
        retrain = nightly.retrain

        def retrain_while_streaming(*args: Any, **kwargs: Any) -> float:
            loss = retrain(*args, **kwargs)
            _produce(cfg, meanwhile)
            _wait(lambda: int(state.items.count.sum()) == 52, "the streaming trainer to learn today's clicks")
            return loss

        monkeypatch.setattr(nightly, "retrain", retrain_while_streaming)
        # What the streaming trainer's rows were just before the merge, and what it merged.
        merged: list[tuple[dict, dict, dict]] = []
        apply = handoff.apply

        def spy_apply(target: TrainerState, payload: dict) -> None:
            merged.append((_rows(target.users), _rows(target.items), payload))
            apply(target, payload)

        monkeypatch.setattr(handoff, "apply", spy_apply)

        result = run_nightly(cfg, DAY, progress=False)
        assert result.status == "trained" and result.handed_over and result.examples == 40
        _wait(lambda: bool(merged), "the streaming trainer to merge the handoff")
        _wait(
            lambda: (
                (c := checkpoint.load(cfg.trainer.state_dir)) is not None and DAY.isoformat() in c.extra["nightly_done"]
            ),
            "the merged checkpoint",
        )
        assert not errors
        users_before, items_before, payload = merged[0]

        # the new tower weights: changed, and exactly the nightly's
        assert state.dense_version == version_before + 1
        now = state.model.state_dict()
        assert any(not torch.equal(now[k], v) for k, v in dense_before.items())
        for name, value in payload["dense"].items():
            assert torch.equal(now[name], value), name
        ckpt = checkpoint.load(cfg.trainer.state_dir)
        for name, value in payload["dense"].items():
            assert torch.equal(ckpt.dense[name], value), name

        # rows: what the streaming trainer learned meanwhile plus what the nightly changed
        today_users = {c.user_id for c in meanwhile}
        for table, before_merge, keys, deltas in (
            (state.users, users_before, payload["users"], payload["user_deltas"]),
            (state.items, items_before, payload["items"], payload["item_deltas"]),
        ):
            delta_of = dict(zip(keys, deltas, strict=True))
            assert delta_of  # the nightly changed rows
            for key, row in table.index.items():
                want = before_merge.get(key, torch.zeros(table.dim)) + delta_of.get(key, 0.0)
                assert torch.equal(table.emb[row], want), key
        start_rows = {u: start_ckpt.users.emb[i] for i, u in enumerate(start_ckpt.users.ids)}
        for user in today_users:  # the streaming trainer's own learning meanwhile is kept
            assert not torch.equal(users_before[user], start_rows[user]), user
        assert (set(payload["users"]) & today_users) == today_users  # both sides moved these rows

        # counted once: the streaming trainer counted every click, the handoff added no counts
        assert int(state.users.count.sum()) == 52 and int(state.items.count.sum()) == 52
        assert _counts(ckpt) == (52, 52)

        # clicks after the handoff are still applied (three, so that they are negatives for each other)
        t_late = meanwhile[-1].ts_ms + 60_000
        late = [
            Interaction(f"late{k}", f"late-r{k}", user, item, CLICK, 0, t_late + k)
            for k, (user, item) in enumerate((("u1", "i3"), ("u2", "i7"), ("u5", "i10")))
        ]
        rows_before = {c.user_id: state.users.emb[state.users.row(c.user_id)].clone() for c in late}
        _produce(cfg, late)
        _wait(lambda: int(state.items.count.sum()) == 55, "the clicks after the handoff")
        _wait(
            lambda: all(not torch.equal(state.users.emb[state.users.row(u)], r) for u, r in rows_before.items()),
            "their rows to move",
        )
        for c in late:
            assert state.histories[c.user_id][-1] == (c.item_id, c.ts_ms)
        for name, value in payload["dense"].items():
            assert torch.equal(state.model.state_dict()[name], value)  # streaming keeps the towers

        # rerunning the date is a no-op: skipped, no handoff, nothing changes
        _wait(
            lambda: (c := checkpoint.load(cfg.trainer.state_dir)) is not None and _counts(c) == (55, 55), "a checkpoint"
        )
        before_rerun = checkpoint.load(cfg.trainer.state_dir)
        assert run_nightly(cfg, DAY, progress=False).status == "skipped"
        assert not (Path(cfg.trainer.state_dir) / handoff.FILENAME).exists()
        time.sleep(0.5)
        assert len(merged) == 1 and state.dense_version == version_before + 1
        for name, value in before_rerun.dense.items():
            assert torch.equal(state.model.state_dict()[name], value)
        assert not errors
    finally:
        trainer.shutdown_flag.set()
        thread.join(timeout=30)
        trainer.shutdown()


# --- the nightly base ----------------------------------------------------------------------------------


def _rows_at_retrain(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, torch.Tensor]]:
    """The user rows each nightly retrain starts from."""
    starts: list[dict[str, torch.Tensor]] = []
    retrain = nightly.retrain

    def spy(state: TrainerState, *args: Any, **kwargs: Any) -> float:
        starts.append(_rows(state.users))
        return retrain(state, *args, **kwargs)

    monkeypatch.setattr(nightly, "retrain", spy)
    return starts


@pytest.mark.parametrize("from_base", [True, False])
def test_nightly_starts_from_the_previous_nightly_rows(
    config: Config, monkeypatch: pytest.MonkeyPatch, from_base: bool
) -> None:
    cfg = _small(config, nightly_from_base=from_base)
    start, _ = day_bounds_ms(DAY, "UTC")
    day1 = _clicks("a", 40, start + 1_000)
    day2 = _clicks("b", 30, start + 86_400_000 + 1_000, users=12)  # four users new on day 2
    _produce(cfg, _catalog() + day1)
    starts = _rows_at_retrain(monkeypatch)
    assert run_nightly(cfg, DAY, progress=False).status == "trained"
    state_dir = Path(cfg.trainer.state_dir)
    assert (state_dir / handoff.BASE_FILENAME).exists() == from_base
    after_day1 = checkpoint.load(state_dir)
    assert after_day1 is not None
    base_rows = {u: after_day1.users.emb[i] for i, u in enumerate(after_day1.users.ids)}

    # a streaming trainer learns day 2 (user rows move), then stops
    _produce(cfg, day2)
    _stream_until_idle(cfg)
    streamed = checkpoint.load(state_dir)
    assert streamed is not None and _counts(streamed) == (70, 70)
    streamed_rows = {u: streamed.users.emb[i] for i, u in enumerate(streamed.users.ids)}
    moved = [u for u, row in base_rows.items() if not torch.equal(row, streamed_rows[u])]
    assert moved  # otherwise the test could not tell the two starts apart

    assert run_nightly(cfg, DAY + dt.timedelta(days=1), progress=False).examples == 30
    start_rows = starts[-1]
    for user, row in start_rows.items():
        if from_base:  # the day-1 nightly's rows; a user it never trained starts at zero
            assert torch.equal(row, base_rows.get(user, torch.zeros(4))), user
        else:  # the streaming trainer's rows
            assert torch.equal(row, streamed_rows[user]), user
    if from_base:
        assert handoff.load_base(state_dir, "9999-12-31")["date"] == (DAY + dt.timedelta(days=1)).isoformat()
        # a forced rerun of day 2 starts from day 1's base again, not from its own result
        assert run_nightly(cfg, DAY + dt.timedelta(days=1), force=True, progress=False).status == "trained"
        for user, row in starts[-1].items():
            assert torch.equal(row, base_rows.get(user, torch.zeros(4))), user


def test_a_stop_during_the_nightly_s_reads_ends_it_there(config: Config, monkeypatch: pytest.MonkeyPatch) -> None:
    """A SIGTERM was only seen between retrain batches: the reads of the catalogue and of the
    day (minutes at scale) ran on, past a container's stop grace period."""
    cfg = _small(config)
    day_ms = day_bounds_ms(DAY, "UTC")[0]
    _produce(cfg, [*_catalog(), *_clicks("s", 30, day_ms + 3_600_000)])
    reads: list[str] = []
    read = nightly.read_topic_range

    def spy(kafka: Any, topic: str, *args: Any) -> Any:
        reads.append(topic)
        return read(kafka, topic, *args)

    monkeypatch.setattr(nightly, "read_topic_range", spy)
    monkeypatch.setattr(nightly, "build_examples", lambda *args: pytest.fail("the stop was not seen in the reads"))
    result = run_nightly(cfg, DAY, progress=False, should_stop=lambda: True)
    assert result.status == "stopped" and reads == [Topics(cfg.kafka.topic_prefix).catalog]
    assert checkpoint.load(cfg.trainer.state_dir) is None  # nothing kept
