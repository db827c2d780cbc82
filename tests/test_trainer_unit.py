"""Unit tests of the trainer's pure parts: ID tables, ordering, losses, the learning step."""

from __future__ import annotations

import datetime as dt
import math
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from trainer import nightly
from trainer import state as state_module
from trainer.id_table import IdTable
from trainer.losses import candidate_log_q, popularity_distribution, sample_with_replacement, sampled_softmax_loss
from trainer.ordering import EventTimeMerger
from trainer.state import HistoryColumns, TrainerState
from trainer.stream import CountedRange, StateLock, StreamTrainer, checkpoint_wait_s
from twotower import checkpoint
from twotower.config import Config, ModelConfig, TrainerConfig
from twotower.events import CLICK, MAX_TS_MS, CatalogItem, Interaction, encode
from twotower.kafka_io import Topics

# --- ID tables ---------------------------------------------------------------------------


def test_id_table_grows_without_collisions() -> None:
    table = IdTable(dim=4, capacity=2)
    rows = [table.observe(f"id{i}", ts_ms=i, seq=1) for i in range(100)]
    assert rows == list(range(100))
    assert len(table) == 100
    assert table.capacity >= 100
    assert table.row("id42") == 42
    assert table.row("nope") == -1


def test_admission_filter_keeps_one_off_ids_out() -> None:
    table = IdTable(dim=4, admission_min_count=3)
    assert table.observe("a", 1, 1) == -1
    assert table.observe("a", 2, 1) == -1
    row = table.observe("a", 3, 1)
    assert row == 0
    assert int(table.count[row]) == 3
    assert table.observe("b", 4, 1) == -1
    assert "b" not in table


def test_expiry_frees_rows_and_reuses_them() -> None:
    table = IdTable(dim=4)
    table.observe("old", ts_ms=1_000, seq=1)
    table.observe("new", ts_ms=100_000, seq=1)
    table.emb[table.row("old")] = 1.0
    gone = table.expire(now_ms=100_000, ttl_ms=50_000, seq=2)
    assert gone == ["old"]
    assert "old" not in table and "new" in table
    row = table.add("fresh", ts_ms=100_000, seq=2)
    assert row == 0  # the freed slot is reused
    assert torch.equal(table.emb[row], torch.zeros(4))  # and starts clean


def test_id_table_state_round_trip() -> None:
    table = IdTable(dim=3, admission_min_count=2)
    for key in ["a", "b", "a", "b", "c"]:
        table.observe(key, 5, 1)
    table.emb[table.row("a")] = torch.tensor([1.0, 2.0, 3.0])
    state, _ = table.to_state()
    again = IdTable.from_state(state, admission_min_count=2)
    assert again.row("a") >= 0 and again.row("c") == -1
    assert torch.equal(again.emb[again.row("a")], torch.tensor([1.0, 2.0, 3.0]))
    assert again.observe("c", 6, 2) >= 0  # pending count survived the round trip


def test_ids_pending_admission_are_bounded_least_recently_seen_first() -> None:
    table = IdTable(dim=2, admission_min_count=3, max_pending=3)
    for key in ("a", "b", "c"):
        assert table.observe(key, ts_ms=1, seq=1) == -1
    table.observe("a", ts_ms=2, seq=1)  # seen again: now the most recent
    table.observe("d", ts_ms=3, seq=1)  # a fourth: b, seen least recently, is forgotten
    assert table.pending == {"c": 1, "a": 2, "d": 1}
    assert table.observe("a", ts_ms=4, seq=1) >= 0  # a's sightings were kept: admitted at its third
    for i in range(10_000):  # a stream of one-off ids
        table.observe(f"once{i}", ts_ms=5, seq=1)
    assert len(table.pending) == 3


# --- event-time merge ---------------------------------------------------------------------


def test_checkpoint_interval_stretches_when_checkpoints_are_slow() -> None:
    assert checkpoint_wait_s(0.04, 1.0, 0.25) == 1.0  # a small state: the configured interval
    assert checkpoint_wait_s(2.0, 1.0, 0.25) == pytest.approx(8.0)  # 2 s of every 8 s at most
    assert checkpoint_wait_s(2.0, 10.0, 0.25) == 10.0


def test_merger_releases_in_event_time_order_and_counts_late() -> None:
    merger = EventTimeMerger(allowance_ms=100)
    tp_a, tp_b = ("events", 0), ("events", 1)
    merger.push(tp_a, 0, 1_000, "a0")
    merger.push(tp_b, 0, 950, "b0")
    merger.push(tp_a, 1, 1_200, "a1")
    assert [v for *_, v in merger.pop_ready()] == ["b0", "a0"]  # watermark 1100
    merger.push(tp_b, 1, 900, "late")
    assert [v for *_, v in merger.pop_ready()] == ["late"]  # below the watermark: released, not dropped
    assert merger.late == 1
    assert [v for *_, v in merger.pop_ready(force=True)] == ["a1"]


def test_merger_safe_offsets_and_replay_skip() -> None:
    merger = EventTimeMerger(allowance_ms=0)
    tp = ("events", 0)
    merger.push(tp, 10, 5_000, "x")  # held: newest
    merger.push(tp, 11, 1_000, "y")  # released below: older in event time
    merger.push(tp, 12, 6_000, "z")
    released = [v for *_, v in merger.pop_ready()]
    assert released == ["y", "x", "z"]
    merger2 = EventTimeMerger(allowance_ms=1_000)
    lagging = ("events", 1)
    merger2.push(lagging, 0, 500, "o")  # a partition far behind: the allowance bounds the wait
    merger2.push(tp, 10, 5_000, "x")
    merger2.push(tp, 11, 1_000, "y")
    assert [v for *_, v in merger2.pop_ready()] == ["o", "y"]  # watermark 4000
    assert merger2.safe_offsets() == {tp: 10, lagging: 1}
    assert merger2.applied_above() == {tp: [11]}
    # after a restart from offset 10, record 11 must not be applied again
    restarted = EventTimeMerger(allowance_ms=1_000)
    restarted.skip_on_replay(merger2.applied_above())
    assert restarted.push(tp, 10, 5_000, "x") is True
    assert restarted.push(tp, 11, 1_000, "y") is False
    assert restarted.safe_offsets() == {tp: 10}
    # record 10 is still held, so a checkpoint now must list 11 again: a crash after it and a
    # second restart from offset 10 must skip 11 once more
    assert restarted.applied_above() == {tp: [11]}
    again = EventTimeMerger(allowance_ms=1_000)
    again.skip_on_replay(restarted.applied_above())
    assert again.push(tp, 11, 1_000, "y") is False


def test_merger_keeps_skips_not_yet_read_again_in_its_checkpoint() -> None:
    """A checkpoint written right after a restart, before any record is read again, lists the
    offsets applied above the safe one, until the safe offset passes them."""
    tp = ("events", 0)
    restarted = EventTimeMerger(allowance_ms=0)
    restarted.skip_on_replay({tp: [11, 12]})
    assert restarted.applied_above() == {tp: [11, 12]}
    assert restarted.push(tp, 10, 5_000, "x") is True
    assert restarted.push(tp, 11, 1_000, "y") is False
    assert restarted.applied_above() == {tp: [11, 12]}  # 10 held: safe offset 10
    restarted.pop_ready(force=True)
    assert restarted.applied_above() == {tp: [12]}  # safe offset 12 (one past 11): 11 pruned


def test_a_record_dead_lettered_above_a_held_one_is_not_handled_again_after_a_restart() -> None:
    """A restart resumes from the held record; the dead letter after it was once sent again."""
    tp, other = ("events", 0), ("events", 1)
    merger = EventTimeMerger(allowance_ms=1_000)
    merger.expect([tp, other])
    merger.push(tp, 10, 5_000, "x")  # held: the other partition has shown nothing yet
    merger.mark_done(tp, 11)  # dead-lettered
    assert merger.safe_offsets() == {tp: 10} and merger.applied_above() == {tp: [11]}
    restarted = EventTimeMerger(allowance_ms=1_000)
    restarted.skip_on_replay(merger.applied_above())
    assert restarted.replayed(tp, 10) is False and restarted.replayed(tp, 11) is True
    assert restarted.replayed(tp, 11) is False  # once
    lone = EventTimeMerger(allowance_ms=0)
    lone.mark_done(tp, 3)  # nothing held: the safe offset passes it, nothing to list
    assert lone.safe_offsets() == {tp: 4} and lone.applied_above() == {}


def test_merger_releases_at_once_when_every_partition_has_moved_past_a_record() -> None:
    merger = EventTimeMerger(allowance_ms=10_000)
    a, b = ("events", 0), ("events", 1)
    merger.expect([a, b])
    merger.push(a, 0, 1_000, "a0")
    assert merger.pop_ready() == []  # b, assigned, has shown nothing yet: it may still bring older ones
    merger.push(b, 0, 1_001, "b0")
    merger.push(a, 1, 1_002, "a1")
    assert [v for *_, v in merger.pop_ready()] == ["a0", "b0"]  # both partitions are past 1001
    merger.push(a, 2, 5_000, "a2")  # b goes quiet: a's records wait for b, at most the allowance
    assert [v for *_, v in merger.pop_ready()] == []
    merger.push(a, 3, 12_000, "a3")
    assert [v for *_, v in merger.pop_ready()] == ["a1"]  # watermark 12000 - 10000 = 2000
    merger.push(b, 1, 990, "b-late")  # b out of its own order, older than a released record: counted late
    assert [v for *_, v in merger.pop_ready()] == ["b-late"] and merger.late == 1


# --- losses -------------------------------------------------------------------------------


def test_softmax_loss_step_raises_positive_score() -> None:
    torch.manual_seed(0)
    users = torch.randn(4, 8, requires_grad=True)
    items = torch.randn(6, 8)
    pos = torch.tensor([0, 1, 2, 3])
    before = (users @ items.T).detach()
    loss = sampled_softmax_loss(users @ items.T, pos)
    loss.backward()
    with torch.no_grad():
        after = (users - 0.1 * users.grad) @ items.T
    gain_pos = (after - before)[torch.arange(4), pos]
    assert (gain_pos > 0).all()


def test_logq_correction_and_accidental_hits() -> None:
    logits = torch.zeros(2, 3)
    pos = torch.tensor([0, 1])
    log_q = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    plain = sampled_softmax_loss(logits, pos)
    assert plain.item() == pytest.approx(math.log(3))  # three equal candidates
    # the correction subtracts log_q: logits log 2, log 4, log 4 (sum of exponentials 10). A popular
    # positive (column 0) is penalised, its loss rises to log(10/2); a rarer one (column 1) falls to log(10/4)
    popular, rare = (sampled_softmax_loss(logits[:1], torch.tensor([col]), log_q).item() for col in (0, 1))
    assert popular == pytest.approx(math.log(10 / 2)) and rare == pytest.approx(math.log(10 / 4))
    corrected = sampled_softmax_loss(logits, pos, log_q)
    assert corrected.item() == pytest.approx((popular + rare) / 2) and corrected.item() > plain.item()
    same = torch.tensor([[True, False, True], [False, True, False]])
    masked = sampled_softmax_loss(logits, pos, None, same)
    # row 0 has a duplicate of its positive in column 2: masked, so fewer competitors
    assert masked.item() < plain.item()


def test_popularity_distribution_power() -> None:
    p = popularity_distribution(torch.tensor([16, 1, 0]))
    assert p[2] == 0
    assert p[0] / p[1] == pytest.approx(16**0.75)
    q = candidate_log_q(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]), 10, 10)
    assert torch.allclose(q, torch.log(torch.tensor([14.0, 6.0])))


def test_sample_with_replacement_follows_the_probabilities_over_any_number_of_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    draws = sample_with_replacement(torch.tensor([0.5, 0.0, 0.25, 0.25]), 40_000, generator)
    freq = torch.bincount(draws, minlength=4).double() / 40_000
    assert freq[1] == 0  # probability 0: never drawn
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.25, 0.25], dtype=torch.float64), atol=0.01)
    many = torch.zeros(2**24 + 8)  # more rows than torch.multinomial accepts
    many[3] = many[-1] = 1.0
    assert set(sample_with_replacement(many, 1_000, generator).tolist()) == {3, 2**24 + 7}


def test_sample_with_replacement_maps_a_draw_rounded_up_to_the_total_on_the_last_row_it_can_draw(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch, "rand", lambda n, dtype, generator: torch.ones(n, dtype=dtype))
    assert sample_with_replacement(torch.tensor([0.0, 0.5, 0.5, 0.0]), 2).tolist() == [2, 2]


def test_log_q_of_a_candidate_without_a_count_is_that_of_one_observation() -> None:
    """A clicked item not admitted yet (no row, no count) is still a candidate of its batch: its
    log Q must be that of one click, not the floor's log(1e-12), which would boost its logit."""
    state = TrainerState(ModelConfig(dim=8, id_dim=4), TrainerConfig(admission_min_count=2, min_extra_negatives=4))

    def click(user: str, item: str, ts: int) -> Interaction:
        return Interaction(f"{user}{item}{ts}", f"r{user}{ts}", user, item, CLICK, 0, ts)

    state.observe_clicks([click("u0", "a", 1), click("u0", "a", 2), click("u0", "b", 3), click("u0", "b", 4)])
    batch = [click("u1", "a", 10), click("u2", "new", 11)]
    state.observe_clicks(batch)
    assert state.items.row("new") < 0  # seen once: not admitted
    ids, _, log_q = state._candidates(batch)
    total = int(state.items.count.sum())
    by_id = dict(zip(ids, log_q.tolist(), strict=True))
    assert by_id["new"] >= math.log(1.0 / total) - 1e-6  # at least one click in `total`, in a batch of 2


# --- the learning step --------------------------------------------------------------------


def _toy(seed: int = 0, n_users: int = 60, n_items: int = 80, n_cats: int = 4):
    """A state over a catalogue where each user clicks only items of one favourite category."""
    rng = np.random.default_rng(seed)
    cats = rng.integers(0, n_cats, n_items)
    fav = rng.integers(0, n_cats, n_users)
    state = TrainerState(
        ModelConfig(dim=16, id_dim=8, hidden=32, content_dim=4), TrainerConfig(stream_lr=0.05, stream_item_rows=True)
    )
    for i in range(n_items):
        state.apply_catalog(CatalogItem(f"i{i}", f"c{cats[i]}", list(np.eye(4)[cats[i]]), 0))

    def clicks(n: int, t0: int) -> list[Interaction]:
        out = []
        for k in range(n):
            u = int(rng.integers(n_users))
            i = int(rng.choice(np.flatnonzero(cats == fav[u])))
            out.append(Interaction(f"e{t0 + k}", "r", f"u{u}", f"i{i}", "click", 0, t0 + k))
        return out

    _toy.fav = {f"u{u}": int(fav[u]) for u in range(n_users)}
    _toy.cats = {f"i{i}": int(cats[i]) for i in range(n_items)}
    return state, clicks


def test_streaming_updates_keep_dense_weights_bit_identical() -> None:
    state, clicks = _toy()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    rows_before = state.items.emb.clone()
    for step in range(20):
        state.learn(state.observe_clicks(clicks(64, step * 1_000)), dense=False)
    for name, value in state.model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert not torch.equal(state.items.emb[: rows_before.shape[0]], rows_before)  # rows did move


def test_nightly_step_moves_dense_weights() -> None:
    state, clicks = _toy()
    before = {k: v.clone() for k, v in state.model.state_dict().items()}
    state.learn(state.observe_clicks(clicks(64, 0)), dense=True)
    changed = [k for k, v in state.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_training_learns_category_preferences() -> None:
    state, clicks = _toy()
    for step in range(40):
        state.learn(state.observe_clicks(clicks(64, step * 1_000)), dense=step % 2 == 0)
    users = [f"u{u}" for u in range(60)]
    items = [f"i{i}" for i in range(80)]
    with torch.no_grad():
        iv = state.item_vectors(items)
        uv = state.model.user(
            state.users.gather(state.users.rows(users)),
            state.profile_matrix(users),
            state.pooled_history([list(state.histories.get(u, [])) for u in users], [10**9] * 60),
        )
    top = (uv @ iv.T).topk(5).indices
    hits = [_toy.cats[items[j]] == _toy.fav[u] for k, u in enumerate(users) for j in top[k].tolist()]
    assert np.mean(hits) > 0.8  # four categories: chance is 0.25


def test_checkpoint_round_trip_resumes_exactly(tmp_path) -> None:
    state, clicks = _toy()
    state.learn(state.observe_clicks(clicks(64, 0)), dense=True)
    state.seq += 1
    checkpoint.save(tmp_path, state.to_checkpoint({"events:0": 64}))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.offsets == {"events:0": 64}
    again = TrainerState.from_checkpoint(loaded, state.tcfg)
    batch = clicks(32, 10_000)
    r1 = state.learn(state.observe_clicks(batch), dense=False)
    r2 = again.learn(again.observe_clicks(batch), dense=False)
    assert r1.loss == pytest.approx(r2.loss, abs=1e-6)
    for key in ["u1", "u2"]:
        if key in state.users:
            torch.testing.assert_close(state.users.emb[state.users.row(key)], again.users.emb[again.users.row(key)])


def test_new_item_content_vector_lands_near_its_category() -> None:
    state, clicks = _toy()
    for step in range(30):
        state.learn(state.observe_clicks(clicks(64, step * 1_000)), dense=True)
    state.apply_catalog(CatalogItem("brand-new", "c2", [0, 0, 1, 0], 0))
    with torch.no_grad():
        ids = [f"i{i}" for i in range(80)]
        iv = state.item_vectors(ids)
        new = state.item_vectors(["brand-new"])[0]
    sims = iv @ new
    same = torch.tensor([state.catalog[i][0] == state.catalog["brand-new"][0] for i in ids])
    assert sims[same].mean() > sims[~same].mean() + 0.1


def _written(state_dir, seq: int) -> str:
    """What the trainer wrote as ``seq``: ``full``, ``update`` or ``nothing``."""
    full = checkpoint.load(state_dir)
    if full is not None and full.seq == seq:
        return "full"
    return "update" if seq in dict(checkpoint.row_updates(state_dir)) else "nothing"


@pytest.mark.parametrize("row_updates", [True, False])
def test_full_checkpoints_are_spaced_out_with_row_updates_between(
    config: Config, monkeypatch: pytest.MonkeyPatch, row_updates: bool
) -> None:
    cfg = config.with_overrides(
        {"trainer": {"checkpoint_interval_s": 1.0, "full_checkpoint_interval_s": 10.0, "row_updates": row_updates}}
    )
    clock = [100.0]
    monkeypatch.setattr("trainer.stream.time.monotonic", lambda: clock[0])
    trainer = StreamTrainer(cfg)
    state = trainer.state = TrainerState(cfg.model, cfg.trainer)
    state_dir = cfg.trainer.state_dir
    kinds = []
    for k in range(1, 25):
        clock[0] += 1.0
        clicks = [Interaction(f"e{k}", f"r{k}", f"u{k}", f"i{k % 3}", "click", 0, 1_700_000_000_000 + k)]
        state.learn(state.observe_clicks(clicks), dense=False)
        trainer.dirty = True
        trainer.checkpoint()
        kinds.append(_written(state_dir, state.seq))
        if kinds[-1] == "update":
            update = checkpoint.load_row_update(dict(checkpoint.row_updates(state_dir))[state.seq])
            assert update is not None and update.users.ids == [f"u{k}"]  # this write's change only
            assert update.base_seq == trainer.full_seq
    if row_updates:  # the first full checkpoint 10 s after the start, then every 10 s
        assert [i + 1 for i, kind in enumerate(kinds) if kind == "full"] == [10, 20]
        assert kinds.count("update") == 22
    else:
        assert kinds == ["full"] * 24
    # idle: nothing to write, except the full checkpoint row updates left owed
    seq = state.seq
    for _ in range(12):
        clock[0] += 1.0
        trainer.checkpoint()
    if row_updates:
        assert state.seq == seq + 1 and _written(state_dir, state.seq) == "full"
        assert checkpoint.row_updates(state_dir) == []
    else:
        assert state.seq == seq


def test_nightly_applies_each_catalogue_item_s_last_version(monkeypatch: pytest.MonkeyPatch) -> None:
    """A catalogue topic not compacted yet holds older versions of an item before its current one."""
    cfg = Config()
    state = TrainerState(cfg.model, cfg.trainer)
    state.apply_catalog(CatalogItem("kept", "c", [1.0], 1))
    stamped = int(state.items.updated_seq[state.items.row("kept")])
    state.seq += 5
    versions = [
        CatalogItem("i1", "old-cat", [1.0], 1),
        CatalogItem("kept", "c", [1.0], 2),  # the same as the state holds
        CatalogItem("i1", "new-cat", [9.0], 3),
    ]
    topics = Topics()
    messages = {
        topics.catalog: [SimpleNamespace(value=encode(v), topic=topics.catalog, timestamp=v.ts_ms) for v in versions]
    }
    monkeypatch.setattr(
        nightly, "read_topic_range", lambda _cfg, topic, _a, _b, _stop=None: iter(messages.get(topic, []))
    )
    nightly.load_side_topics(cfg, topics, state)
    category, content = state.catalog["i1"]
    assert category == state.categories["new-cat"] and content[0] == 9.0
    assert int(state.items.updated_seq[state.items.row("kept")]) == stamped  # unchanged: not stamped again


def test_a_second_nightly_run_waits_for_the_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config().with_overrides({"trainer": {"state_dir": str(tmp_path)}})
    runs: list[dt.date] = []
    monkeypatch.setattr(nightly, "_run_nightly", lambda _cfg, date, *_: runs.append(date))
    first = StateLock(tmp_path, nightly.NIGHTLY_LOCK)  # a run in progress
    assert first.acquire(blocking=False)
    second = threading.Thread(target=nightly.run_nightly, args=(cfg, dt.date(2024, 3, 10)))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive() and not runs  # waiting, not training beside the first
    first.release()
    second.join(timeout=10)
    assert runs == [dt.date(2024, 3, 10)]


def test_a_nightly_stops_between_batches_when_asked_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, clicks = _toy()
    examples = [(c, []) for c in clicks(64, 0)]
    asked = iter([False, False, True])
    with pytest.raises(nightly.NightlyStopped):
        nightly.retrain(state, examples, seed=0, batch_size=16, progress=False, should_stop=lambda: next(asked))

    def stopped(*args: object) -> None:
        raise nightly.NightlyStopped

    monkeypatch.setattr(nightly, "_run_nightly", stopped)
    cfg = Config().with_overrides({"trainer": {"state_dir": str(tmp_path)}})
    assert nightly.run_nightly(cfg, dt.date(2024, 3, 10), should_stop=lambda: True).status == "stopped"
    assert StateLock(tmp_path, nightly.NIGHTLY_LOCK).acquire(blocking=False)  # released


def test_a_counted_range_covers_the_offsets_the_nightly_read_of_its_day() -> None:
    day = (1_000, 2_000)
    ranges = nightly.counted_ranges(None, day, [(0, 5, None), (0, 9, None), (2, 4, None)], "ev", True)  # type: ignore[list-item]
    assert ranges == [[1_000, 2_000, {"ev:0": [5, 9], "ev:2": [4, 4]}]]
    counted = CountedRange.from_extra(ranges[0])
    assert counted.covers(("ev", 0), 5, 1_000) and counted.covers(("ev", 0), 9, 1_999)
    assert not counted.covers(("ev", 0), 10, 1_500)  # arrived after the nightly's read
    assert not counted.covers(("ev", 1), 0, 1_500)  # a partition where it read none of the day
    assert not counted.covers(("ev", 0), 7, 2_000)  # another day
    assert counted.to_extra() == ranges[0]
    assert not counted.passed({("ev", 0): 10, ("ev", 2): 4}) and counted.passed({("ev", 0): 10, ("ev", 2): 5})
    older = CountedRange.from_extra([1_000, 2_000])  # written before offsets were recorded: the whole day
    assert not older.passed({("ev", 0): 10**9})
    assert older.covers(("ev", 1), 10**9, 1_000) and older.to_extra() == [1_000, 2_000]
    ckpt = SimpleNamespace(extra={nightly.NIGHTLY_COUNTED: [[1_000, 2_000]]})
    assert nightly.counted_ranges(ckpt, day, [], "ev", True) == [[1_000, 2_000]]  # type: ignore[arg-type]
    assert nightly.counted_ranges(ckpt, (2_000, 3_000), [], "ev", False) == [[1_000, 2_000]]  # type: ignore[arg-type]


def _day_clicks(user: str, n: int, t0_ms: int, tag: str) -> list[Interaction]:
    return [Interaction(f"{tag}{k}", f"{tag}r{k}", user, f"{tag}-i{k}", CLICK, 0, t0_ms + k * 1_000) for k in range(n)]


def test_read_back_goes_day_by_day_until_every_history_is_whole() -> None:
    """history_len 5: u0's history holds only the day's 5 clicks; 2 of its pre-day clicks are two
    days back, 3 three days back, more four days back. u1 does not click on the day. Without the
    overflow, the read-back stops at the day that completes u0, and returns what was lost oldest
    first."""
    day = (10 * 86_400_000, 11 * 86_400_000)
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=5), TrainerConfig())
    by_day = {
        back: _day_clicks("u0", n, day[0] - back * 86_400_000, f"b{back}") for back, n in ((2, 2), (3, 3), (4, 4))
    }
    state.observe_clicks(by_day[4] + by_day[3] + by_day[2] + _day_clicks("u1", 6, day[0] - 86_400_000, "v"))
    on_day = _day_clicks("u0", 5, day[0] + 1_000, "d")
    state.observe_clicks(on_day)  # a streaming trainer counted them: every pre-day click of u0 is out
    assert nightly.lost_pre_day_clicks(state, day, on_day, counted=on_day) == {}  # the overflow holds them
    state.history_overflow.clear()  # as resumed from a checkpoint written before the overflow
    state.overflow_since_ms = state.event_time_ms
    lost = nightly.lost_pre_day_clicks(state, day, on_day, counted=on_day)
    assert lost == {"u0": 5}  # 9 lost, 5 needed
    asked: list[int] = []

    def read_day(back: int) -> list[Interaction]:
        asked.append(back)
        return by_day.get(back, [])

    found = nightly.read_back_lost_clicks(state, day, lost, read_day, max_days=7)
    assert asked == [1, 2, 3]
    assert found == by_day[3] + by_day[2]
    examples = nightly.build_examples(state, on_day[:1], day[0], found)
    assert examples[0][1] == [(c.item_id, c.ts_ms) for c in by_day[3] + by_day[2]]

    asked.clear()
    assert nightly.read_back_lost_clicks(state, day, lost, read_day, max_days=2) == by_day[2]  # as far as allowed
    assert asked == [1, 2]
    assert nightly.read_back_lost_clicks(state, day, lost, read_day, max_days=0) == []
    # the count bounds the search: with only 2 clicks lost, the day that holds them ends it
    asked.clear()
    assert nightly.read_back_lost_clicks(state, day, {"u0": 2}, read_day, max_days=7) == by_day[2]
    assert asked == [1, 2]


def test_read_back_skips_users_who_lost_nothing() -> None:
    """A history at its length need not have lost anything: a user whose first clicks came on the
    day, or who holds every click it made, is not read back for; nor is a user who does not click
    on the day, whatever it lost."""
    day = (10 * 86_400_000, 11 * 86_400_000)
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=5), TrainerConfig())
    new = _day_clicks("new", 6, day[0] + 1_000, "n")  # first seen on the day, 6 clicks
    full = _day_clicks("full", 2, day[0] - 3_600_000, "f") + _day_clicks("full", 3, day[0] + 1_000, "g")
    idle = _day_clicks("idle", 7, day[0] - 3_600_000, "i") + _day_clicks("idle", 5, day[1] + 1_000, "j")
    state.observe_clicks(sorted(new + full + idle, key=lambda c: c.ts_ms))
    state.overflow_since_ms = state.event_time_ms  # the count bound alone (the overflow not trusted)
    on_day = [c for c in new + full if c.ts_ms >= day[0]]
    assert nightly.lost_pre_day_clicks(state, day, on_day, counted=on_day) == {}
    # the same state, had the streaming trainer not counted the day's clicks of "full": its count
    # would then say more clicks than the history holds, and the bound would not rule it out
    assert nightly.lost_pre_day_clicks(state, day, on_day, counted=new) == {"full": 3}


def _interleaved_days(seed: int, n_users: int, per_day: int, days: int) -> list[Interaction]:
    """Clicks of ``n_users`` users on ``days`` UTC days from day 10, at random times, sorted."""
    rng = np.random.default_rng(seed)
    out = []
    for d in range(days):
        for k in range(per_day):
            ts = (10 + d) * 86_400_000 + int(rng.integers(0, 86_400_000))
            user, item = f"u{rng.integers(n_users)}", f"i{rng.integers(50)}"
            out.append(Interaction(f"e{d}-{k}", f"r{d}-{k}", user, item, CLICK, 0, ts))
    return sorted(out, key=lambda c: c.ts_ms)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beside_a_streaming_trainer_the_nightly_starts_from_the_histories_before_the_day(seed: int) -> None:
    """A streaming state that has counted day 11 and part of day 12 gives day 11's nightly the
    same examples as a state that stopped at day 11's start (a nightly owning the state), without
    reading anything back: what the day's clicks pushed out is in the overflow."""
    clicks = _interleaved_days(seed, n_users=6, per_day=60, days=3)  # busy users: 10 a day, history_len 4
    day = (11 * 86_400_000, 12 * 86_400_000)
    before = [c for c in clicks if c.ts_ms < day[0]]
    on_day = [c for c in clicks if day[0] <= c.ts_ms < day[1]]
    streamed = [c for c in clicks if c.ts_ms < day[1] + 43_200_000]
    mcfg, tcfg = ModelConfig(dim=8, id_dim=4, history_len=4), TrainerConfig()
    owner, streaming = TrainerState(mcfg, tcfg), TrainerState(mcfg, tcfg)
    owner.observe_clicks(before)
    streaming.observe_clicks(streamed)
    expected = nightly.build_examples(owner, on_day, day[0])
    assert any(len(h) == 4 for _, h in expected)

    def read_day(back: int) -> list[Interaction]:
        raise AssertionError("nothing to read back")

    lost = nightly.lost_pre_day_clicks(streaming, day, on_day, counted=on_day)
    assert lost == {} and streaming.holds_pre_day_histories(day[0])
    assert nightly.read_back_lost_clicks(streaming, day, lost, read_day, max_days=7) == []
    got = nightly.build_examples(streaming, on_day, day[0])
    assert [(c.event_id, h) for c, h in got] == [(c.event_id, h) for c, h in expected]
    # and after a checkpoint (the nightly reads the streaming trainer's)
    resumed = TrainerState.from_checkpoint(streaming.to_checkpoint({}), tcfg)
    assert dict(resumed.history_overflow) == dict(streaming.history_overflow)
    assert nightly.build_examples(resumed, on_day, day[0]) == got


def test_the_overflow_keeps_what_a_nightly_still_needs_and_drops_the_rest() -> None:
    """history_len 2. A click pushes out an entry of its own day: not kept (newer ones of that day
    follow it). Of an earlier day: kept until the nightly of the day after it has run."""
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=2), TrainerConfig())
    d10, d11, d12 = (d * 86_400_000 for d in (10, 11, 12))  # 1970-01-11, -12, -13
    state.observe_clicks(_day_clicks("u", 3, d10 + 1_000, "a"))  # a0 pushed out by a2, same day
    assert "u" not in state.history_overflow
    state.observe_clicks(_day_clicks("u", 3, d11 + 1_000, "b"))  # a1, a2, b0 pushed out on day 11
    assert state.history_overflow["u"] == [("a-i1", d10 + 2_000), ("a-i2", d10 + 3_000)]
    assert state.pre_day_history("u", d11) == [("a-i1", d10 + 2_000), ("a-i2", d10 + 3_000)]
    state.observe_clicks(_day_clicks("u", 1, d12 + 1_000, "c"))  # b1 pushed out on day 12: kept
    assert state.history_overflow["u"][-1] == ("b-i1", d11 + 2_000)
    assert state.pre_day_history("u", d12) == [("b-i1", d11 + 2_000), ("b-i2", d11 + 3_000)]
    state.nightly_trained("1970-01-12")  # day 11's nightly done: day 12's needs b1 (and b2, held)
    assert state.nightly_done == ["1970-01-12"]
    assert state.history_overflow["u"] == [("b-i1", d11 + 2_000)]
    state.nightly_trained("1970-01-13")
    assert "u" not in state.history_overflow


def test_a_late_click_in_a_full_overflow_keeps_what_each_pending_nightly_needs() -> None:
    """history_len 1, an overflow of 2: x (day 15), y (day 16) overflow as z (day 17) comes; then
    w, late, from day 16: day 16's nightly needs x, day 17's w; y is needed by none."""
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=1), TrainerConfig())
    hour = 3_600_000

    def at(name: str, ts: int) -> Interaction:
        return Interaction(name, "r", "u", name, CLICK, 0, ts)

    x, y, z, w = (
        at("x", 16 * 24 * hour - hour),
        at("y", 16 * 24 * hour + 11 * hour),
        at("z", 17 * 24 * hour + hour),
        at("w", 17 * 24 * hour - hour),
    )
    state.observe_clicks([x, y, z])
    assert state.history_overflow["u"] == [("x", x.ts_ms), ("y", y.ts_ms)]
    state.observe_clicks([w])
    assert state.history_overflow["u"] == [("x", x.ts_ms), ("w", w.ts_ms)]
    assert state.pre_day_history("u", 16 * 24 * hour) == [("x", x.ts_ms)]
    assert state.pre_day_history("u", 17 * 24 * hour) == [("w", w.ts_ms)]


def test_times_far_in_the_future_neither_fail_nor_empty_the_overflow() -> None:
    """The schema takes times up to year 9999: a click then must not fail the trainer, and a state
    whose event time one such click moved must still keep what the next nightly needs."""
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=2), TrainerConfig())
    d11, d12 = 11 * 86_400_000, 12 * 86_400_000
    state.observe_clicks(_day_clicks("u", 3, d11 + 1_000, "b") + _day_clicks("u", 1, d12 + 1_000, "c"))
    assert state.history_overflow["u"] == [("b-i1", d11 + 2_000)]
    state.observe_clicks([Interaction("far", "r", "v", "i", CLICK, 0, MAX_TS_MS)] * 3)
    state.observe_clicks(_day_clicks("v", 1, MAX_TS_MS, "f"))
    assert state.event_time_ms == MAX_TS_MS
    state.nightly_trained("1970-01-12")  # day 11's: day 12's nightly still needs b1
    assert state.history_overflow["u"] == [("b-i1", d11 + 2_000)]
    for date in ("9999-12-30", "9999-12-31"):
        state.nightly_trained(date)


@pytest.mark.parametrize("seed", range(4))
def test_pruning_an_overflow_keeps_each_user_s_newest_entries_before_each_day_start(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Column-wise pruning against a per-user reference, over users with and without a history,
    freed slots, one or several day starts, in steps of all users or of 7."""
    monkeypatch.setattr(state_module, "PRUNE_ROWS", 7 if seed % 2 else 65_536)
    rng = np.random.default_rng(seed)
    length = int(rng.integers(1, 5))
    overflow, history = HistoryColumns(2 * length), HistoryColumns(length)
    for u in range(40):
        times = np.sort(rng.integers(0, 10_000, int(rng.integers(1, 2 * length + 1))))
        overflow[f"u{u}"] = [(f"i{t}", int(t)) for t in times]
        if rng.random() < 0.7:
            newer = np.sort(rng.integers(int(times[-1]), 12_000, int(rng.integers(1, length + 1))))
            history[f"u{u}"] = [(f"j{t}", int(t)) for t in newer]
    del overflow["u3"]  # a freed slot
    starts = sorted(int(t) for t in rng.integers(0, 12_000, int(rng.integers(1, 4))))
    expected = {}
    for user, entries in overflow.items():
        theirs = [(t, 1, -1) for _, t in history.get(user, [])]
        merged = sorted([(t, 0, i) for i, (_, t) in enumerate(entries)] + theirs)
        keep: set[int] = set()
        for start in starts:
            before = [m for m in merged if m[0] < start][-length:]
            keep.update(i for _, own, i in before if own == 0)
        if keep:
            expected[user] = [e for i, e in enumerate(entries) if i in keep]
    overflow.keep_newest_before(starts, length, history)
    assert dict(overflow) == expected
    overflow["new"] = [("x", 1)]  # freed slots are reused
    assert overflow["new"] == [("x", 1)]


def test_the_overflow_is_trusted_for_a_day_only_when_kept_since_it_began_and_the_stream_is_near() -> None:
    """No read-back when the state kept its overflow since before the day and its event time is
    at most the next day; a state resumed from a checkpoint without the overflow trusts it only
    for days that begin after that checkpoint's event time."""
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=2), TrainerConfig())
    d10, d11, d12 = (d * 86_400_000 for d in (10, 11, 12))
    state.observe_clicks(_day_clicks("u", 1, d11 + 5, "a"))
    assert state.holds_pre_day_histories(d11) and state.holds_pre_day_histories(d10)
    state.observe_clicks(_day_clicks("u", 1, d12 + 5, "b"))
    assert state.holds_pre_day_histories(d11) and not state.holds_pre_day_histories(d10)
    data = checkpoint.encode(state.to_checkpoint({}))
    del data["history_overflow"], data["extra"]["overflow_since_ms"]  # written before the overflow
    resumed = TrainerState.from_checkpoint(checkpoint.decode(data), state.tcfg)
    assert resumed.overflow_since_ms == d12 + 5
    assert not resumed.holds_pre_day_histories(d12) and resumed.holds_pre_day_histories(d12 + 86_400_000)
    again = TrainerState.from_checkpoint(state.to_checkpoint({}), state.tcfg)
    assert again.overflow_since_ms == 0 and again.holds_pre_day_histories(d11)


def test_the_overflow_is_not_trusted_for_a_day_already_retrained_or_starting_at_an_upgrade() -> None:
    """A forced rerun of a day whose nightly pruned the overflow reads back; so does a day that
    begins exactly at the event time of a checkpoint written before the overflow (whole-day
    timestamps make that the usual case)."""
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=2), TrainerConfig())
    d11 = 11 * 86_400_000
    before, on_day = _day_clicks("u", 2, d11 - 43_200_000, "a"), _day_clicks("u", 2, d11 + 1_000, "b")
    state.observe_clicks(before + on_day)
    assert state.holds_pre_day_histories(d11) and len(state.pre_day_history("u", d11)) == 2
    state.nightly_trained("1970-01-12")
    assert not state.holds_pre_day_histories(d11)
    lost = nightly.lost_pre_day_clicks(state, (d11, d11 + 86_400_000), on_day, counted=on_day)
    assert lost == {"u": 2}
    found = nightly.read_back_lost_clicks(state, (d11, d11 + 86_400_000), lost, lambda back: before, max_days=1)
    assert nightly.build_examples(state, on_day, d11, found)[0][1] == [(c.item_id, c.ts_ms) for c in before]

    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=1), TrainerConfig())
    state.observe_clicks([Interaction("a", "r", "u", "a", CLICK, 0, d11 - 86_395_000)])
    state.observe_clicks([Interaction("b", "r", "u", "b", CLICK, 0, d11)])
    data = checkpoint.encode(state.to_checkpoint({}))
    del data["history_overflow"], data["extra"]["overflow_since_ms"]  # written before the overflow
    resumed = TrainerState.from_checkpoint(checkpoint.decode(data), state.tcfg)
    assert resumed.overflow_since_ms == d11 and not resumed.holds_pre_day_histories(d11)


def test_without_the_overflow_trusted_the_read_back_completes_the_history_alone() -> None:
    """history_len 2. The overflow of the nightly of day 11, run two days late, lacks a1 and a2
    (pruned by a full row) but holds x, a late click between them: the read-back must give the
    newest two before the day, x and a2, not a1 in front of x."""
    state = TrainerState(ModelConfig(dim=8, id_dim=4, history_len=2), TrainerConfig())
    hour = 3_600_000

    def at(name: str, day: int, h: int) -> Interaction:
        return Interaction(name, "r", "u", name, CLICK, 0, day * 24 * hour + h * hour)

    a1, a2, b1, b2, c1, e1, e2, x = (
        at("a1", 10, 6),
        at("a2", 10, 18),
        at("b1", 11, 6),
        at("b2", 11, 12),
        at("c1", 12, 12),
        at("e1", 13, 6),
        at("e2", 13, 7),
        at("x", 10, 12),
    )
    state.observe_clicks([a1, a2, b1, b2, c1, e1, e2, x])
    day = (11 * 24 * hour, 12 * 24 * hour)
    assert not state.holds_pre_day_histories(day[0])
    lost = nightly.lost_pre_day_clicks(state, day, [b1, b2], counted=[b1, b2])
    found = nightly.read_back_lost_clicks(state, day, lost, lambda back: [a1, x, a2] if back == 1 else [], max_days=7)
    assert nightly.build_examples(state, [b1, b2], day[0], found)[0][1] == [("x", x.ts_ms), ("a2", a2.ts_ms)]
