"""Tests of the replay evaluation harness on small synthetic logs (no services, seconds to run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from evaluation.cli import load_events
from evaluation.metrics import PolicyMetrics, Series, ndcg
from evaluation.policies import ALSNightly, ItemKNNStream, Policy, PopularityPolicy, fold_in_user, top_unseen
from evaluation.protocol import MS_PER_DAY, Event, Protocol, World
from evaluation.replay import Step, Warmed, make_policies, prequential, run
from evaluation.two_tower import TwoTowerPolicy
from producers.replay_formats import LogSpec
from twotower.config import ModelConfig, TrainerConfig

REPO = Path(__file__).resolve().parents[1]
DAY0 = 10_000 * MS_PER_DAY  # 1997-05-19, midnight UTC
TINY_MODEL = ModelConfig(dim=8, id_dim=4, hidden=16, n_categories=4, content_dim=2, profile_dim=2, history_len=5)


def tiny_trainer(tmp_path: Path) -> TrainerConfig:
    return TrainerConfig(state_dir=tmp_path / "state", batch_size=16, seed=0)


def synthetic_log(n_users: int = 24, n_items: int = 30, days: int = 4, per_day: int = 60, seed: int = 0) -> list[Event]:
    """Users in three taste groups picking items of their group, spread over a few UTC days."""
    rng = np.random.default_rng(seed)
    events = []
    for d in range(days):
        times = np.sort(rng.integers(0, MS_PER_DAY, size=per_day))
        for t in times.tolist():
            user = int(rng.integers(0, n_users))
            group = user % 3
            item = int(rng.integers(0, n_items // 3)) * 3 + group
            events.append(Event(f"u{user}", f"i{item}", DAY0 + d * MS_PER_DAY + t))
    return events


class Spy(Policy):
    """Records every call; recommends the items it has learned (a leak would score hits)."""

    name = "spy"
    nightly = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.learned: list[str] = []

    def bootstrap(self, warmup: Sequence[Event], world: World) -> None:
        self.calls.append(("bootstrap", len(warmup)))

    def end_of_day(self, day: int, events: Sequence[Event], world: World) -> None:
        self.calls.append(("end_of_day", day, list(events)))

    def advance(self, now_ms: int, world: World) -> None:
        self.calls.append(("advance", now_ms))

    def recommend(self, user: str, now_ms: int, world: World, n: int) -> list[str]:
        self.calls.append(("recommend", user, now_ms, tuple(world.history(user)), frozenset(world.seen_by(user))))
        return list(reversed(self.learned))[:n]

    def learn(self, event: Event, world: World) -> None:
        self.calls.append(("learn", event))
        self.learned.append(event.item)


# --- protocol --------------------------------------------------------------------------------


def test_each_event_is_scored_before_it_is_learned_and_never_leaks() -> None:
    # every event brings a brand-new item: only a policy that saw the event before scoring it could hit
    events = [Event(f"u{i % 3}", f"i{i}", DAY0 + i * 60_000) for i in range(20)]
    spy = Spy()
    protocol = Protocol(warmup_fraction=0.5)
    steps = [s for s in prequential(events, [spy], protocol) if isinstance(s, Step)]
    assert [s.index for s in steps] == list(range(10, 20))
    kinds = [c[0] for c in spy.calls]
    assert kinds[0] == "bootstrap" and spy.calls[0][1] == 10
    # per event: advance, recommend, learn, in that order
    assert kinds[1:] == ["advance", "recommend", "learn"] * 10
    for step, (rec, learn) in zip(steps, zip(spy.calls[2::3], spy.calls[3::3], strict=True), strict=True):
        _, user, now, history, seen = rec
        assert (user, now) == (step.event.user, step.event.ts_ms)
        assert learn[1] == step.event
        assert step.event.item not in seen
        assert all(ts < now for _, ts in history)  # the world holds only earlier events
    metrics = run(events, [Spy()], protocol).metrics["spy"]
    assert metrics.events == 10 and metrics.hits == 0


def test_warm_up_is_learned_but_not_scored() -> None:
    events = synthetic_log(days=2)
    result = run(events, [PopularityPolicy()], Protocol(warmup_fraction=0.6))
    assert result.warmup_events == math.floor(len(events) * 0.6)
    assert result.metrics["popularity_7d"].events == len(events) - result.warmup_events


def test_day_boundaries_trigger_nightly_retrains_on_the_previous_day() -> None:
    events = synthetic_log(days=4, per_day=20)
    spy = Spy()
    list(prequential(events, [spy], Protocol(warmup_fraction=0.3)))
    n_warm = math.floor(len(events) * 0.3)
    expected = []
    previous = events[n_warm - 1].ts_ms // MS_PER_DAY
    for event in events[n_warm:]:
        if event.ts_ms // MS_PER_DAY != previous:
            expected.append(previous)
            previous = event.ts_ms // MS_PER_DAY
    nightly = [c for c in spy.calls if c[0] == "end_of_day"]
    assert [c[1] for c in nightly] == expected and len(expected) >= 2
    for _, day, day_events in nightly:  # the whole day, warm-up part included
        assert day_events == [e for e in events if e.ts_ms // MS_PER_DAY == day]
    # the retrain comes before the first recommendation of the next day, never within a day
    for i, call in enumerate(spy.calls):
        if call[0] == "end_of_day":
            following = next(c for c in spy.calls[i:] if c[0] == "recommend")
            assert following[2] // MS_PER_DAY > call[1]


def test_day_boundary_after_a_gap_retrains_once_on_the_last_day_with_events() -> None:
    events = [Event("a", f"i{i}", DAY0 + i * 1000) for i in range(4)]
    events += [Event("a", "late", DAY0 + 5 * MS_PER_DAY)]
    spy = Spy()
    list(prequential(events, [spy], Protocol(warmup_fraction=0.5)))
    nightly = [c for c in spy.calls if c[0] == "end_of_day"]
    assert len(nightly) == 1 and nightly[0][1] == 10_000 and len(nightly[0][2]) == 4


def test_seen_items_are_excluded_and_short_lists_filled_from_popularity() -> None:
    world = World(Protocol())
    for i, item in enumerate(["x", "y", "y", "z", "z", "z"]):
        world.observe(Event("other", item, DAY0 + i))
    world.observe(Event("me", "z", DAY0 + 10))
    recs, filled = world.fill(["z", "x", "x"], "me", 3)
    assert recs == ["x", "y"] and filled == 1  # z was seen; x deduplicated; y from popularity; nothing left
    assert world.popular(3, world.seen_by("me")) == ["y", "x"]
    assert top_unseen(np.array([0.1, 0.9, 0.5, 0.9]), ["a", "b", "c", "d"], {"b"}, 2) == ["d", "c"]
    # ties at the cut go by index too (the partial sort picks among them at random)
    tied = [f"x{i}" for i in range(31)]
    assert top_unseen(np.array([1.0] * 30 + [2.0]), tied, set(), 3) == ["x30", "x0", "x1"]


def test_history_delay_hides_recent_interactions_from_pooling_not_from_exclusion() -> None:
    world = World(Protocol(history_delay_s=60))
    world.observe(Event("me", "old", DAY0))
    world.observe(Event("me", "new", DAY0 + 50_000))
    world.advance(DAY0 + 70_000)
    assert world.history_newest_first("me") == [("old", DAY0)]  # "new" is 20 s old: not yet visible
    assert world.seen_by("me") == {"old", "new"}
    world.advance(DAY0 + 110_000)
    assert world.history_newest_first("me") == [("new", DAY0 + 50_000), ("old", DAY0)]
    assert World(Protocol()).history("nobody") == ()


def test_replayed_lists_never_contain_seen_items(tmp_path: Path) -> None:
    events = synthetic_log(days=3)
    protocol = Protocol(warmup_fraction=0.5, publish_every_s=60)
    policies = make_policies(
        ["popularity_7d", "als_nightly", "itemknn_stream", "two_tower_nightly", "two_tower_streaming"],
        protocol,
        TINY_MODEL,
        tiny_trainer(tmp_path),
        bootstrap_epochs=1,
    )
    seen: dict[str, set[str]] = {}
    for step in prequential(events, policies, protocol):
        if isinstance(step, Warmed):
            for e in events[: step.warmup_events]:
                seen.setdefault(e.user, set()).add(e.item)
            continue
        for name, recs in step.recs.items():
            assert len(recs) == len(set(recs)), name
            assert not set(recs) & seen.get(step.event.user, set()), name
        seen.setdefault(step.event.user, set()).add(step.event.item)


def test_trailing_popularity_window_expires_old_events() -> None:
    world = World(Protocol(popularity_days=1.0))
    world.observe(Event("u", "old", DAY0))
    world.observe(Event("u", "old2", DAY0))
    world.observe(Event("v", "new", DAY0 + MS_PER_DAY // 2))
    world.advance(DAY0 + MS_PER_DAY)  # the two old events are exactly one day old: out of the window
    assert world.popular(5) == ["new"]


# --- two-tower publishing -------------------------------------------------------------------


def test_streaming_updates_become_visible_only_after_the_publish_interval(tmp_path: Path) -> None:
    events = synthetic_log(days=1, per_day=80)
    protocol = Protocol(warmup_fraction=0.5, publish_every_s=600)
    (policy,) = make_policies(["two_tower_streaming"], protocol, TINY_MODEL, tiny_trainer(tmp_path), 1)
    assert isinstance(policy, TwoTowerPolicy)
    scored: list[int] = []
    versions = set()
    for step in prequential(events, [policy], protocol):
        if isinstance(step, Warmed):
            continue
        due = sum(1 for t in scored if t <= step.event.ts_ms - protocol.publish_every_ms)
        # what was learned (and published) at scoring time is only clicks at least publish_every old
        assert policy.streamed <= due
        assert policy.published_seq == policy.state.seq  # everything learned is published
        versions.add(policy.serving.version)
        scored.append(step.event.ts_ms)
    assert policy.streamed > 0 and len(versions) > 1


def test_nightly_two_tower_publishes_a_new_full_version_each_day(tmp_path: Path) -> None:
    events = synthetic_log(days=3, per_day=30)
    protocol = Protocol(warmup_fraction=0.3)
    (policy,) = make_policies(["two_tower_nightly"], protocol, TINY_MODEL, tiny_trainer(tmp_path), 1)
    assert isinstance(policy, TwoTowerPolicy)
    versions: dict[int, set[int]] = {}
    dense: dict[int, int] = {}
    for step in prequential(events, [policy], protocol):
        if isinstance(step, Step):
            assert policy.serving is not None and policy.state is not None
            versions.setdefault(step.day, set()).add(policy.serving.version)
            dense[step.day] = policy.state.dense_version
    assert all(len(v) == 1 for v in versions.values())  # nothing is published within a day
    days = sorted(versions)
    assert [min(versions[d]) for d in days] == sorted({min(versions[d]) for d in days})
    assert len(set(dense.values())) == len(days)  # the towers change at every boundary
    assert policy.retrains == len(days) - 1


# --- metrics ---------------------------------------------------------------------------------


def test_metrics_on_a_hand_checked_example() -> None:
    m = PolicyMetrics(k=2, recall_k=3)
    m.update("a", ["a", "b", "c"], cold=True, new_user=False, fallback=0)  # rank 0: HR, NDCG 1
    m.update("b", ["a", "b", "c"], cold=False, new_user=True, fallback=0)  # rank 1: HR, NDCG 1/log2(3)
    m.update("c", ["a", "b", "c"], cold=True, new_user=True, fallback=3)  # rank 2: recall only (all fallback)
    m.update("z", ["d", "e", "f"], cold=False, new_user=False, fallback=1)  # miss (list topped up)
    s = m.summary(n_catalogue=10)
    assert s["HR@2"] == pytest.approx(0.5)
    assert s["Recall@3"] == pytest.approx(0.75)
    assert s["NDCG@2"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert s["coverage"] == pytest.approx(4 / 10)  # a, b, d, e in the top 2
    assert s["HR@2_cold_items"] == pytest.approx(0.5)
    assert s["HR@2_new_users"] == pytest.approx(0.5)
    assert s["events_evaluated"] == 4
    assert s["fallback_share"] == pytest.approx(0.25) and s["filled_share"] == pytest.approx(0.25)
    assert ndcg(None, 10) == 0.0 and ndcg(10, 10) == 0.0


def test_popularity_replay_matches_hand_computation() -> None:
    t = DAY0
    events = [
        Event("a", "x", t),
        Event("b", "x", t + 1),
        Event("b", "y", t + 2),
        Event("c", "z", t + 3),  # warm-up ends here (4 of 8)
        Event("c", "x", t + 4),  # ranking x(2) y(1,t+2) z(1,t+3): c saw z → [x, y]: hit at rank 0
        Event("a", "z", t + 5),  # x(3) z(1,t+3) y(1,t+2); a saw x → [z, y]: hit at rank 0
        Event("d", "y", t + 6),  # x(3) z(2) y(1) → [x, z]: miss at k=2; recall at 3 (rank 2)
        Event("a", "w", t + 7),  # never seen before: miss
    ]
    result = run(events, [PopularityPolicy()], Protocol(k=2, recall_k=3, warmup_fraction=0.5))
    s = result.to_json()["results"]["popularity_7d"]
    assert s["HR@2"] == pytest.approx(0.5)
    assert s["Recall@3"] == pytest.approx(0.75)
    assert s["NDCG@2"] == pytest.approx(0.5)
    assert s["HR@2_cold_items"] == pytest.approx(0.5)  # every item is younger than 7 days
    assert s["events_evaluated"] == 4


def test_itemknn_scores_against_the_live_history() -> None:
    world = World(Protocol())
    for user, item in [("a", "x"), ("a", "y"), ("b", "x"), ("b", "y"), ("c", "z"), ("c", "w")]:
        world.observe(Event(user, item, DAY0))
    knn = ItemKNNStream()
    knn.bootstrap([], world)
    assert knn.recommend("d", DAY0, world, 5) == []  # no history: no usable state
    world.observe(Event("d", "x", DAY0 + 1))  # visible at once, no rebuild needed
    assert knn.recommend("d", DAY0 + 2, world, 5) == ["y"]


def test_series_bins_hold_equal_event_counts() -> None:
    series = Series()
    for day, h in [(1, 1.0), (1, 0.0), (2, 1.0), (3, 1.0), (3, 1.0), (4, 0.0)]:
        series.add(day, {"p": h})
    binned = series.binned(3)
    assert binned["events"] == [2, 3, 1]
    assert binned["hr"]["p"] == pytest.approx([0.5, 1.0, 0.0])
    assert binned["bin_last_day"] == [1, 3, 4]


# --- determinism and the command -------------------------------------------------------------


def _strip_runtime(report: dict) -> dict:
    report = json.loads(json.dumps(report))
    report.pop("runtime_s", None)
    for policy in report["policies"].values():
        policy.pop("seconds", None)
        policy.pop("bootstrap_seconds", None)
    return report


def test_replay_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    events = synthetic_log(days=3)
    names = ["popularity_7d", "als_nightly", "itemknn_stream", "two_tower_nightly", "two_tower_streaming"]
    reports = []
    for _ in range(2):
        protocol = Protocol(warmup_fraction=0.5, publish_every_s=60, seed=3)
        policies = make_policies(names, protocol, TINY_MODEL, tiny_trainer(tmp_path), bootstrap_epochs=1)
        reports.append(_strip_runtime(run(events, policies, protocol).to_json()))
    assert reports[0] == reports[1]
    assert reports[0]["results"]["two_tower_streaming"]["events_evaluated"] == len(events) - len(events) * 5 // 10


def test_cli_writes_json_and_plot_identically_across_hash_seeds(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    rows = ["ts,extra,item,user"] + [
        f"{e.ts_ms // 1000},x,{e.item[1:]}.0,{e.user}" for e in synthetic_log(days=2, per_day=40)
    ]
    log.write_text("\n".join(rows) + "\n")
    outputs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"r{hash_seed}.json"
        env = {
            **os.environ,
            "PYTHONHASHSEED": hash_seed,
            "TWOTOWER_MODEL__DIM": "8",
            "TWOTOWER_MODEL__HIDDEN": "16",
            "TWOTOWER_MODEL__ID_DIM": "4",
            "TWOTOWER_TRAINER__BATCH_SIZE": "16",
        }
        env.pop("TWOTOWER_CONFIG", None)
        cmd = [
            sys.executable,
            "-c",
            "from evaluation.cli import app; app()",
            "replay",
            "--data",
            str(log),
            "--format",
            "csv",
            "--user-col",
            "user",
            "--item-col",
            "item",
            "--time-col",
            "ts",
            "--json",
            str(out),
            "--plot",
            str(tmp_path / "hr.png"),
            "--seed",
            "1",
            "--publish-every",
            "30",
            "--bootstrap-epochs",
            "1",
            "--no-progress",
        ]
        subprocess.run(cmd, check=True, cwd=REPO, env=env, capture_output=True, timeout=240)
        outputs.append(_strip_runtime(json.loads(out.read_text())))
    assert outputs[0] == outputs[1]
    assert set(outputs[0]["results"]) == {
        "popularity_7d",
        "als_nightly",
        "itemknn_stream",
        "two_tower_nightly",
        "two_tower_streaming",
    }
    assert outputs[0]["protocol"]["publish_every_s"] == 30
    assert (tmp_path / "hr.png").stat().st_size > 1000


def test_load_events_handles_headerless_csv_with_named_columns(tmp_path: Path) -> None:
    log = tmp_path / "log.csv"
    log.write_text("7.0,100,5,900\n3,99,4,800\n")
    spec = LogSpec(
        "csv", "user", "item", "time", has_header=False, columns=["user", "time", "r", "item"], time_unit="s"
    )
    events = load_events(log, spec)
    assert events == [Event("3", "800", 99_000), Event("7", "900", 100_000)]
    with pytest.raises(ValueError, match="fixed columns"):
        load_events(log, LogSpec("movielens-100k", user_col="user"))


# --- item side information --------------------------------------------------------------------


def test_csv_category_side_reads_the_first_category_of_each_item(tmp_path: Path) -> None:
    from evaluation.cli import load_item_side

    path = tmp_path / "log.csv"
    path.write_text("user_id,item_id,category_id,timestamp\n1,7,3,100\n2,7,4,200\n2,8,,300\n")
    side = load_item_side(path, "csv", "category_id")
    assert {k: v.category for k, v in side.items()} == {"7": "3", "8": "unknown"}
    with pytest.raises(ValueError):
        load_item_side(path, "movielens-100k", "category_id")


def test_evaluate_reads_a_tab_separated_log_in_milliseconds(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evaluation.cli import app

    data = tmp_path / "log.tsv"
    rows = "".join(f"u{i % 3}\ti{i % 5}\tc{i % 2}\t{1_000 * i}\n" for i in range(40))
    data.write_text("user\titem\tcat\tts\n" + rows)
    events = load_events(data, LogSpec("csv", delimiter="\t", time_unit="ms"))
    assert len(events) == 40 and events[1].ts_ms == 1_000  # read as milliseconds, not seconds
    with pytest.raises(ValueError, match="fixed columns; --delimiter apply to format csv only"):
        load_events(data, LogSpec("movielens-100k", delimiter="\t"))
    out = tmp_path / "o.json"
    args = ["replay", "--data", str(data), "--format", "csv", "--delimiter", "tab", "--time-unit", "ms"]
    args += ["--category-col", "cat", "--policies", "popularity_7d", "--json", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    data_report = json.loads(out.read_text())["data"]
    assert data_report["catalogue_items"] == 5
    assert data_report["read_as"] == {
        "user_col": None, "item_col": None, "time_col": None, "has_header": True, "columns": None,
        "delimiter": "\t", "time_unit": "ms",
    }  # fmt: skip


def test_csv_category_side_reads_a_quoted_header_and_refuses_a_column_past_every_row(tmp_path: Path) -> None:
    from evaluation.cli import load_item_side

    path = tmp_path / "log.csv"
    path.write_text('\n"user_id","item_id","category_id","timestamp"\n1,7,3,100\n')
    assert {k: v.category for k, v in load_item_side(path, "csv", "category_id").items()} == {"7": "3"}
    with pytest.raises(ValueError, match="column 9 is beyond the fields of every row"):
        load_item_side(path, "csv", "9")


def test_evaluate_refuses_bad_policies_and_unwritable_outputs_before_the_run(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evaluation.cli import app

    data = tmp_path / "log.csv"
    data.write_text("user_id,item_id,timestamp\n1,7,100\n2,7,200\n")
    (tmp_path / "afile").write_text("")
    runner = CliRunner()
    base = ["replay", "--data", str(data), "--format", "csv", "--json"]
    for args, message in (
        ([*base, str(tmp_path / "o.json"), "--policies", ",,,"], "give one or more distinct policies"),
        ([*base, str(tmp_path / "o.json"), "--policies", "popularity_7d,popularity_7d"], "distinct policies"),
        ([*base, str(tmp_path / "afile" / "o.json")], "cannot write"),
        ([*base, str(tmp_path / "o.json"), "--plot", str(tmp_path / "afile" / "p.png")], "cannot write"),
    ):
        result = runner.invoke(app, args)
        flat = " ".join(result.output.replace("│", " ").split())  # the error box wraps long paths
        assert result.exit_code == 2 and message in flat, (args, result.output)
    assert not (tmp_path / "o.json").exists()  # refused before the run wrote anything


def test_commands_refuse_infinite_and_nan_numbers(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from evaluation.cli import app

    for option in ("--days", "--publish-every"):  # (NaN fails their minimum already)
        result = CliRunner().invoke(app, ["simulate", option, "inf", "--json", str(tmp_path / "o.json")])
        flat = " ".join(result.output.replace("│", " ").split())
        assert result.exit_code == 2 and "must be a finite number" in flat, result.output


def test_movielens_side_comes_from_u_item_beside_u_data(tmp_path: Path) -> None:
    from evaluation.cli import load_item_side

    data = tmp_path / "u.data"
    data.write_text("1\t5\t3\t881250949\n")
    assert load_item_side(data, "movielens-100k") == {}
    flags = ["0"] * 19
    flags[1] = flags[4] = "1"
    (tmp_path / "u.item").write_text("5|Film (1995)|01-Jan-1995||http://x|" + "|".join(flags) + "\n")
    side = load_item_side(data, "movielens-100k")
    assert side["5"].category == "Action" and sum(side["5"].features) == 2


def test_two_tower_policies_learn_an_items_catalogue_record_at_its_first_event(tmp_path: Path) -> None:
    from evaluation.catalog import ItemSide

    events = synthetic_log(days=3, per_day=20)
    side = {f"i{i}": ItemSide(f"c{i % 3}", (1.0, 0.0)) for i in range(30)}
    protocol = Protocol(warmup_fraction=0.5)
    policies = make_policies(
        ["two_tower_nightly", "two_tower_streaming"], protocol, TINY_MODEL, tiny_trainer(tmp_path), 1, item_side=side
    )
    warm = {e.item for e in events[: len(events) // 2]}
    for step in prequential(events, policies, protocol):
        for policy in policies:
            assert isinstance(policy, TwoTowerPolicy) and policy.state is not None
            known = set(policy.state.catalog)
            if isinstance(step, Warmed):
                assert known == warm
            else:  # never an item before its first event
                assert known <= {e.item for e in events[: step.index]}
    for policy in policies:
        assert set(policy.state.catalog) > warm  # later items arrived too


def test_als_fold_in_solves_the_fits_own_equations_for_a_user() -> None:
    """Folding a user's items into fixed item factors gives what implicit computes for that
    user from the same item factors (``recalculate_user``)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    matrix = sp.csr_matrix((rng.random((30, 40)) < 0.15).astype(np.float32))
    model = AlternatingLeastSquares(
        factors=8, regularization=0.05, alpha=2.0, iterations=5, random_state=0, num_threads=1
    )
    with threadpool_limits(1):
        model.fit(matrix, show_progress=False)
    items = np.asarray(model.item_factors, dtype=np.float64)
    for user in range(5):
        row = matrix[user]
        want = np.asarray(model.recalculate_user(user, row)).ravel()
        got = fold_in_user(items.astype(np.float32), items.T @ items, row.indices.tolist(), 2.0, 0.05)
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)


def test_als_scores_a_user_first_seen_after_its_last_fit_on_their_history() -> None:
    world, policy = World(Protocol()), ALSNightly(factors=4, iterations=3)
    for k in range(40):
        world.observe(Event(f"u{k % 8}", f"i{k % 10}", k * 1_000))
    policy.bootstrap([], world)
    world.observe(Event("newcomer", "i1", 50_000))
    world.observe(Event("newcomer", "i3", 51_000))
    got = policy.recommend("newcomer", 52_000, world, 5)
    assert len(got) == 5 and not {"i1", "i3"} & set(got)


def test_the_nightly_only_policy_counts_the_warm_ups_last_day_once(tmp_path: Path) -> None:
    """The warm-up ends inside a day: the warm-up counted its first events; the day's nightly
    counts the rest only, as ``train nightly`` skips what a checkpoint already holds."""
    day0 = 10_000 * MS_PER_DAY
    events = [Event("u0", "i0", day0 + 1), Event("u0", "i1", day0 + 2)]
    events += [Event("u1", f"i{k}", day0 + 3 + k) for k in range(2, 10)]
    events.append(Event("u2", "i9", day0 + MS_PER_DAY + 5))  # the next day: the first nightly runs
    protocol = Protocol(seed=0)
    names = ["two_tower_nightly", "two_tower_streaming"]
    policies = make_policies(names, protocol, TINY_MODEL, tiny_trainer(tmp_path), 1)
    for _ in prequential(events, policies, protocol):
        pass
    nightly, streaming = (p.state for p in policies)  # type: ignore[attr-defined]
    assert nightly is not None and streaming is not None
    assert nightly.histories["u0"] == streaming.histories["u0"] == [("i0", day0 + 1), ("i1", day0 + 2)]
    assert int(nightly.users.count[nightly.users.row("u0")]) == 2
