"""Unit tests of the producers: the simulator's ground truth and the replay format readers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest

from producers.replay import AHEAD_LIMIT_CONFIG, BEHIND_LIMIT_CONFIG, check_times
from producers.replay_formats import (
    MS_THRESHOLD,
    LogSpec,
    SourceRow,
    guess_columns,
    movielens_genres,
    movielens_items,
    movielens_titles,
    normalize_id,
    parse_timestamp,
    read_csv,
    read_csv_rows,
    read_movielens_100k,
    read_movielens_csv,
    read_rows,
)
from producers.simulate import RetrieverError, _RecentClicks, fetch_slate
from producers.world import SimulatorWorld
from twotower.config import SimulatorConfig


def small_cfg(**overrides: object) -> SimulatorConfig:
    values: dict[str, object] = {"n_users": 200, "n_items": 600, "n_categories": 8, "latent_dim": 16, "seed": 7}
    values.update(overrides)
    return SimulatorConfig(**values)


# ----------------------------------------------------------------------------- world


def test_world_is_deterministic_for_a_seed() -> None:
    a, b = SimulatorWorld(small_cfg(), 12, 6), SimulatorWorld(small_cfg(), 12, 6)
    np.testing.assert_array_equal(a.item_latent, b.item_latent)
    np.testing.assert_array_equal(a.item_content, b.item_content)
    np.testing.assert_array_equal(a.user_profile, b.user_profile)
    draws = []
    for world in (a, b):
        world.advance(30.0)
        new = [item.item_id for item in world.maybe_new_items()]
        users = [world.pick_user() for _ in range(20)]
        picks = [world.organic_click(u, exclude={1, 2}) for u in users]
        draws.append((new, users, picks, world.popular_slate(10), world.random_slate(10)))
    assert draws[0] == draws[1]
    np.testing.assert_array_equal(a.user_latent, b.user_latent)
    c = SimulatorWorld(small_cfg(seed=8), 12, 6)
    assert not np.allclose(a.item_content[:600], c.item_content)


def test_world_shapes_ids_and_dims() -> None:
    world = SimulatorWorld(small_cfg(), content_dim=5, profile_dim=0)
    assert world.item_content.shape == (600, 5) and world.item_content.dtype == np.float32
    assert world.user_profile.shape == (200, 0)
    item = world.item(12)
    assert item.item_id == "i12" and item.category.startswith("c") and item.content.shape == (5,)
    assert world.user_id(3) == "u3"
    assert world.item_index("i12") == 12
    assert world.item_index("x12") is None and world.item_index("i") is None and world.item_index("i1a") is None
    np.testing.assert_allclose(np.linalg.norm(world.item_latent, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(world.user_latent, axis=1), 1.0)
    with pytest.raises(ValueError, match="content_dim"):
        SimulatorWorld(small_cfg(), content_dim=-1, profile_dim=0)


def test_interests_drift_at_the_configured_speed() -> None:
    world = SimulatorWorld(small_cfg(drift_per_s=0.002), 8, 4)
    before = world.user_latent.copy()
    world.advance(50.0)  # 0.1 rad for users that do not reach their target
    angle = np.arccos(np.clip(np.einsum("ij,ij->i", before, world.user_latent), -1, 1))
    assert np.all(angle <= 0.1 + 1e-9)
    assert np.median(angle) == pytest.approx(0.1, abs=1e-6)
    assert world.now_s == 50.0
    with pytest.raises(ValueError, match="backwards"):
        world.advance(-1.0)


def test_drift_does_not_depend_on_step_size() -> None:
    coarse, fine = SimulatorWorld(small_cfg(), 8, 4), SimulatorWorld(small_cfg(), 8, 4)
    coarse.advance(20.0)
    for _ in range(200):
        fine.advance(0.1)
    np.testing.assert_allclose(coarse.user_latent, fine.user_latent, atol=1e-6)


def test_no_drift_when_speed_is_zero() -> None:
    world = SimulatorWorld(small_cfg(drift_per_s=0.0), 8, 4)
    before = world.user_latent.copy()
    world.advance(1000.0)
    np.testing.assert_array_equal(before, world.user_latent)


def test_users_reaching_their_target_keep_drifting() -> None:
    world = SimulatorWorld(small_cfg(drift_per_s=1.0), 8, 4)
    for _ in range(10):
        world.advance(1.0)  # 1 rad per step: most users arrive and draw new targets
    np.testing.assert_allclose(np.linalg.norm(world.user_latent, axis=1), 1.0)
    before = world.user_latent.copy()
    world.advance(0.5)
    assert np.all(np.einsum("ij,ij->i", before, world.user_latent) < 1.0 - 1e-6)


def test_new_items_arrive_on_schedule() -> None:
    world = SimulatorWorld(small_cfg(new_item_every_s=2.0), 8, 4)
    assert world.maybe_new_items(1.9) == []
    new = world.maybe_new_items(2.0)
    assert [item.item_id for item in new] == ["i600"]
    new = world.maybe_new_items(10.5)
    assert [item.item_id for item in new] == ["i601", "i602", "i603", "i604"]
    assert world.n_items == 605
    assert world.true_scores(0).shape == (605,)
    world.advance(12.0)
    assert [item.item_id for item in world.maybe_new_items()] == ["i605"]


def test_new_item_content_lands_nearest_its_category() -> None:
    cfg = small_cfg(n_items=1000, new_item_every_s=1.0)
    world = SimulatorWorld(cfg, content_dim=16, profile_dim=4)
    centroids = np.stack([world.item_content[world.item_category == c].mean(axis=0) for c in range(cfg.n_categories)])
    new = world.maybe_new_items(100.0)
    assert len(new) == 100
    nearest = [f"c{np.argmin(((centroids - item.content) ** 2).sum(axis=1))}" for item in new]
    accuracy = np.mean([n == item.category for n, item in zip(nearest, new, strict=True)])
    assert accuracy >= 0.9


def test_popularity_and_activity_are_skewed() -> None:
    world = SimulatorWorld(small_cfg(zipf_a=1.1), 8, 4)
    pop = np.sort(world.item_popularity)[::-1]
    assert pop[:60].sum() / pop.sum() > 0.5  # top 10% of items hold most of the popularity
    rng = np.random.default_rng(0)
    picks = np.bincount([world.popular_slate(10, rng)[0] for _ in range(300)], minlength=world.n_items)
    top = np.argsort(-world.item_popularity)[:60]
    assert picks[top].sum() / picks.sum() > 0.5
    users = np.bincount([world.pick_user(rng) for _ in range(4000)], minlength=world.n_users)
    assert np.sort(users)[::-1][:20].sum() / users.sum() > 0.25  # top 10% of users


def test_organic_clicks_follow_true_preferences_and_exclusions() -> None:
    world = SimulatorWorld(small_cfg(), 8, 4)
    rng = np.random.default_rng(1)
    chosen = [world.affinity(u)[world.organic_click(u, rng=rng)] for u in range(100)]
    assert np.mean(chosen) > 0.5 > world.item_latent.mean(axis=0) @ world.user_latent.mean(axis=0)
    everything_but_5 = set(range(world.n_items)) - {5}
    assert world.organic_click(0, exclude=everything_but_5) == 5
    assert 0 <= world.organic_click(0, exclude=set(range(world.n_items))) < world.n_items


def test_slates_and_clicks() -> None:
    world = SimulatorWorld(small_cfg(), 8, 4)
    rng = np.random.default_rng(2)
    slate = world.random_slate(10, rng)
    assert len(set(slate)) == 10
    assert sorted(world.random_slate(10_000, rng)) == list(range(world.n_items))
    popular = world.popular_slate(10, rng)
    assert len(set(popular)) == 10
    assert list(world.item_popularity[popular]) == sorted(world.item_popularity[popular], reverse=True)
    assert len(world.popular_slate(10_000, rng)) == world.n_items
    best = [list(np.argsort(-world.affinity(u))[:10]) for u in range(100)]
    best_clicks = sum(len(world.slate_clicks(u, best[u], rng)) for u in range(100))
    random_clicks = sum(len(world.slate_clicks(u, world.random_slate(10, rng), rng)) for u in range(100))
    assert best_clicks > 5 * max(random_clicks, 1)
    assert world.slate_clicks(0, [-1] * 10, rng) == []
    assert world.click_probability(0, [best[0][0], -1])[1] == 0.0


def test_recent_clicks_keep_the_last_distinct_items() -> None:
    recent = _RecentClicks(3)
    for item in (1, 2, 3, 1, 4):
        recent.add(item)
    assert recent.items == {3, 1, 4}  # 1 was refreshed, so 2 is the oldest and went first
    nothing = _RecentClicks(0)
    nothing.add(5)
    assert nothing.items == set()


# ----------------------------------------------------------------------------- retriever client


def _client(handler) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler), timeout=0.3)


def test_fetch_slate_reads_items_and_version() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/recommend"
        assert request.url.params["user_id"] == "u1" and request.url.params["k"] == "3"
        return httpx.Response(200, json={"items": [{"item_id": "i1", "score": 1.0}, {"item_id": 7}], "version": 4})

    with _client(handler) as client:
        assert fetch_slate(client, "http://retriever/", "u1", 3) == (["i1", "7"], 4)


@pytest.mark.parametrize(
    ("response", "message"),
    [
        (httpx.Response(503, json={"detail": "no snapshot"}), "HTTP 503"),
        (httpx.Response(200, text="not json"), "unexpected response body"),
        (httpx.Response(200, json={"results": []}), "unexpected response body"),
    ],
)
def test_fetch_slate_errors(response: httpx.Response, message: str) -> None:
    with _client(lambda request: response) as client, pytest.raises(RetrieverError, match=message):
        fetch_slate(client, "http://retriever", "u1", 3)


def test_fetch_slate_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with _client(handler) as client, pytest.raises(RetrieverError, match="ReadTimeout"):
        fetch_slate(client, "http://retriever", "u1", 3)


# ----------------------------------------------------------------------------- timestamps and ids


@pytest.mark.parametrize(
    ("text", "unit", "expected"),
    [
        ("881250949", "auto", 881_250_949_000),
        ("881250949.5", "auto", 881_250_949_500),
        ("1700000000123", "auto", 1_700_000_000_123),
        (str(MS_THRESHOLD - 1), "auto", (MS_THRESHOLD - 1) * 1000),
        (str(MS_THRESHOLD), "auto", MS_THRESHOLD),
        ("1000", "ms", 1000),
        ("1000", "s", 1_000_000),
        ("20200101", "s", 20_200_101_000),  # said to be seconds: taken as such
        ("1970-01-02", "auto", 86_400_000),
        ("1970-01-01T00:00:01.5Z", "auto", 1500),
        ("1970-01-01 02:00:00+02:00", "iso", 0),
    ],
)
def test_parse_timestamp(text: str, unit: str, expected: int) -> None:
    assert parse_timestamp(text, unit) == expected


@pytest.mark.parametrize(
    ("text", "unit", "message"),
    [
        ("yesterday", "auto", "bad timestamp 'yesterday'"),
        ("12:00", "s", "expected a number of seconds"),
        ("nan", "auto", "not a finite number"),
        ("-5", "auto", "before 1970"),
        ("", "auto", "empty timestamp"),
        ("1", "days", "time unit must be one of"),
        ("1760000000000000", "auto", "after the year 9999"),  # microseconds
        ("1760000000000000000", "ms", "after the year 9999"),  # nanoseconds
        ("20200101", "auto", "read as seconds is 1970-08-22: a date written as digits"),  # was taken silently
        ("43831.5", "auto", "read as seconds is 1970-01-01"),  # a spreadsheet's day number
    ],
)
def test_parse_timestamp_errors(text: str, unit: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_timestamp(text, unit)


def test_normalize_id() -> None:
    assert normalize_id(" 12.0 ") == "12"
    assert normalize_id("12.000") == "12"
    assert normalize_id("-3.0") == "-3"
    assert normalize_id("12.5") == "12.5"
    assert normalize_id("B00012.0X") == "B00012.0X"
    with pytest.raises(ValueError, match="empty id"):
        normalize_id("  ")


# ----------------------------------------------------------------------------- generic CSV


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_csv_with_header_any_order_extra_columns_float_ids(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "ts,rating,item,user,comment\n300,5,7.0,1.0,nice\n100,3,8,2,\n200,1,B01,3.0,meh\n",
    )
    rows = list(read_csv(path, user_col="user", item_col="item", time_col="ts", time_unit="s"))
    assert rows == [("2", "8", 100_000), ("3", "B01", 200_000), ("1", "7", 300_000)]


def test_csv_without_header_by_names_or_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "1700000000500\ti9\tu1\n1700000000000\ti8\tu2\n", "log.tsv")
    by_name = list(
        read_csv(
            path,
            has_header=False,
            columns=["time", "item", "user"],
            user_col="user",
            item_col="item",
            time_col="time",
            delimiter="\t",
        )
    )
    assert by_name == [("u2", "i8", 1_700_000_000_000), ("u1", "i9", 1_700_000_000_500)]
    by_number = list(read_csv(path, has_header=False, user_col=2, item_col="1", time_col=0, delimiter="\t"))
    assert by_number == by_name
    guessed = list(read_csv(path, has_header=False, columns=["timestamp", "item_id", "user_id"], delimiter="\t"))
    assert guessed == by_name


def test_csv_columns_override_header_and_guessing(tmp_path: Path) -> None:
    path = write(tmp_path, "a,b,c\nu1,i1,2020-01-01T00:00:00\n")
    assert list(read_csv(path, columns=["userId", "movieId", "Timestamp"])) == [("u1", "i1", 1_577_836_800_000)]
    assert guess_columns(["UserID", "product_id", "unixReviewTime"]) == ("UserID", "product_id", "unixReviewTime")
    with pytest.raises(ValueError, match="cannot tell which column holds the item"):
        guess_columns(["user", "rating", "time"])


def test_csv_sort_is_stable_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, "user,item,time\n\nu1,a,5\nu2,b,1\nu3,c,5\nu4,d,1\n")
    rows = read_csv_rows(path, user_col="user", item_col="item", time_col="time", time_unit="s")
    assert [(r.user_id, r.line) for r in rows] == [("u2", 4), ("u4", 6), ("u1", 3), ("u3", 5)]


def test_csv_missing_column_message(tmp_path: Path) -> None:
    path = write(tmp_path, "user,item,time\nu1,i1,1\n")
    with pytest.raises(ValueError, match=r"column 'ts' not found; columns are \['user', 'item', 'time'\]"):
        read_csv_rows(path, user_col="user", item_col="item", time_col="ts")
    with pytest.raises(ValueError, match="column number 9 is out of range"):
        read_csv_rows(path, user_col="user", item_col=9, time_col="time")
    with pytest.raises(ValueError, match="without a header"):
        read_csv_rows(path, has_header=False, user_col="user", item_col="item", time_col="time")
    with pytest.raises(ValueError, match="without a header, give the user, item and time columns"):
        read_csv_rows(path, has_header=False)


def test_a_quote_left_open_is_an_error_not_rows_read_into_one_field(tmp_path: Path) -> None:
    """The rows after it once became the field's text: read without a word, or after 131,072
    characters a csv.Error traceback."""
    path = write(tmp_path, 'user,item,ts,note\nu1,i1,1600000000,"hello\nu2,i2,1600000001,x\nu3,i3,1600000002,y\n')
    with pytest.raises(ValueError, match=r"log\.csv:\d+: unexpected end of data \(a quote left open\?\)"):
        read_csv_rows(path)
    big = write(tmp_path, 'user,item,ts,note\nu1,i1,1600000000,"hello\n' + "u2,i2,1600000001,x\n" * 20_000, "big.csv")
    with pytest.raises(ValueError, match=r"big\.csv:\d+: field larger than field limit"):
        read_csv_rows(big)
    fine = write(tmp_path, 'user,item,ts,note\nu1,i1,1600000000,"a, ""quoted"" note"\n', "fine.csv")
    assert [(r.user_id, r.line) for r in read_csv_rows(fine)] == [("u1", 2)]


def test_columns_a_name_could_mean_twice_are_not_chosen_between_silently(tmp_path: Path) -> None:
    both = write(tmp_path, "user_id,userId,item,timestamp\nu1,u9,i1,1600000000\n")
    with pytest.raises(ValueError, match=r"log\.csv: columns \['user_id', 'userId'\] could each hold the user"):
        read_csv_rows(both)
    twice = write(tmp_path, "user,item,ts,ts\nu1,i1,1600000000,1700000000\n", "twice.csv")
    with pytest.raises(ValueError, match=r"twice\.csv: there are 2 columns named 'ts'; give its 0-based number"):
        read_csv_rows(twice, user_col="user", item_col="item", time_col="ts")
    assert read_csv_rows(twice, user_col="user", item_col="item", time_col=3)[0].ts_ms == 1_700_000_000_000
    unknown = write(tmp_path, "who,what,when\nu1,i1,1600000000\n", "unknown.csv")
    with pytest.raises(ValueError, match=r"unknown\.csv: cannot tell which column holds the user"):
        read_csv_rows(unknown)


def test_csv_bad_rows_name_their_line(tmp_path: Path) -> None:
    path = write(tmp_path, "user,item,time\nu1,i1,1\nu2,i2,soon\n")
    with pytest.raises(ValueError, match=r"log\.csv:3: bad timestamp 'soon'"):
        read_csv_rows(path, user_col="user", item_col="item", time_col="time", time_unit="s")
    path = write(tmp_path, "user,item,time\nu1,i1,1\nu2,i2\n")
    with pytest.raises(ValueError, match=r"log\.csv:3: expected at least 3 fields, got 2"):
        read_csv_rows(path, user_col="user", item_col="item", time_col="time", time_unit="s")
    path = write(tmp_path, "user,item,time\nu1, ,1\n")
    with pytest.raises(ValueError, match=r"log\.csv:2: empty id"):
        read_csv_rows(path, user_col="user", item_col="item", time_col="time", time_unit="s")
    # ids the event schema refuses fail the read, before the replayer sends any event
    path = write(tmp_path, "user,item,time\nu1,i1,1\nu2," + "i" * 257 + ",2\n")
    with pytest.raises(ValueError, match=r"log\.csv:3: id must have 1\.\.256 characters"):
        read_csv_rows(path, user_col="user", item_col="item", time_col="time", time_unit="s")
    path = write(tmp_path, "user,item,time\nu1,i1,1\nu\x002,i2,2\n")
    with pytest.raises(ValueError, match=r"log\.csv:3: id must not contain NUL"):
        read_csv_rows(path, user_col="user", item_col="item", time_col="time", time_unit="s")
    with pytest.raises(ValueError, match="empty file"):
        read_csv_rows(write(tmp_path, "\n"), user_col="user", item_col="item", time_col="time")


def test_csv_reading_refuses_a_long_delimiter_and_names_an_undecodable_line(tmp_path: Path) -> None:
    path = write(tmp_path, "user,item,time\nu1,i1,1\n")
    for delimiter in ("", "ab"):
        with pytest.raises(ValueError, match="the delimiter must be one character"):
            read_csv_rows(path, delimiter=delimiter)
    path.write_bytes(b"user,item,time\nu1,i1,1\nu\xe9,i2,2\n")
    with pytest.raises(ValueError, match=r"log\.csv:3: not utf-8-sig text \(invalid continuation byte\)"):
        read_csv_rows(path)
    path.write_bytes(b"user,item,time\ru1,i1,1\ru2,i2,2\ru3,i3,3\ru\xe9,i4,4\r")  # old Mac line ends
    with pytest.raises(ValueError, match=r"log\.csv:5: not utf-8-sig text"):
        read_csv_rows(path)


def test_a_first_line_of_data_is_not_taken_for_a_header(tmp_path: Path) -> None:
    path = write(tmp_path, "u1,i1,1600000000\nu2,i2,1600000001\n")
    with pytest.raises(ValueError, match=r"the first line looks like data \(its time field is '1600000000'\)"):
        read_csv_rows(path, user_col=0, item_col=1, time_col=2)  # it dropped the first row
    assert len(read_csv_rows(path, user_col=0, item_col=1, time_col=2, has_header=False)) == 2
    iso = write(tmp_path, "u1,i1,2020-01-01T00:00:00\nu2,i2,2020-01-02T00:00:00\n")
    with pytest.raises(ValueError, match="the first line looks like data"):
        read_csv_rows(iso, user_col=0, item_col=1, time_col=2)
    named = write(tmp_path, "user,item,2020\nu1,i1,1600000000\n")  # a header whose time column is "2020"
    assert [r.user_id for r in read_csv_rows(named, user_col="user", item_col="item", time_col="2020")] == ["u1"]


def test_replay_refuses_bad_arguments_before_connecting(tmp_path: Path) -> None:
    from producers.replay import _short_name, replay
    from twotower.config import Config

    cfg = Config()  # nothing below reaches Kafka
    path = write(tmp_path, "1\t2\t3\t4\n", "u.data")
    for speed in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="speed must be a positive number"):
            replay(cfg, path, "movielens-100k", speed=speed)
    with pytest.raises(ValueError, match="fixed columns; --delimiter, --no-header apply to format csv only"):
        replay(cfg, path, LogSpec("movielens-100k", has_header=False, delimiter=";"))
    long = "x" * 300 + ".csv"
    assert _short_name("log.csv") == "log.csv" and len(_short_name(long)) == 73
    assert _short_name(long) != _short_name("x" * 300 + ".tsv")  # a digest of the whole name


def test_fixed_formats_refuse_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "1\t2\t3\t4\n", "u.data")
    with pytest.raises(ValueError, match="fixed columns; --user-col apply to format csv only"):
        read_rows(path, "movielens-100k", user_col="x")
    with pytest.raises(ValueError, match="unknown format 'parquet'"):
        read_rows(path, "parquet")


def test_movielens_csv(tmp_path: Path) -> None:
    path = write(tmp_path, "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,29,3.0,1260759100\n", "ratings.csv")
    assert list(read_movielens_csv(path)) == [("1", "29", 1_260_759_100_000), ("1", "31", 1_260_759_144_000)]


# ----------------------------------------------------------------------------- real datasets (read in place)


def test_movielens_100k_u_data(dataset: Callable[[str], Path]) -> None:
    rows = list(read_movielens_100k(dataset("ml-100k/u.data")))
    assert len(rows) == 100_000
    times = [t for _, _, t in rows]
    assert times == sorted(times)
    assert rows[0] == ("259", "255", 874_724_710_000)
    assert len({u for u, _, _ in rows}) == 943 and len({i for _, i, _ in rows}) == 1682


def test_movielens_100k_items(dataset: Callable[[str], Path]) -> None:
    u_item, u_genre = dataset("ml-100k/u.item"), dataset("ml-100k/u.genre")
    items = list(movielens_items(u_item))
    assert len(items) == 1682
    assert items[0] == ("1", "Animation", [0.0, 0.0, 0.0, 1.0, 1.0, 1.0] + [0.0] * 13)
    assert all(len(features) == 19 for _, _, features in items)
    assert movielens_genres(u_genre)[:3] == ["unknown", "Action", "Adventure"]
    assert movielens_titles(u_item)["1"] == "Toy Story (1995)"


def test_movielens_items_bad_line(tmp_path: Path) -> None:
    path = write(tmp_path, "1|Toy Story (1995)|01-Jan-1995||url" + "|0" * 19 + "\n2|Broken|x\n", "u.item")
    with pytest.raises(ValueError, match=r"u\.item:2: expected 24 '\|'-separated fields, got 3"):
        list(movielens_items(path))


def test_ciao_csv_with_guessed_columns(dataset: Callable[[str], Path]) -> None:
    rows = list(read_csv(dataset("ciao/ratings.csv")))
    assert len(rows) == 36_065
    assert [t for _, _, t in rows] == sorted(t for _, _, t in rows)


def test_a_log_with_rows_the_broker_would_refuse_is_refused_whole() -> None:
    now = 1_700_000_000_000
    hour = 3_600_000
    ahead = {AHEAD_LIMIT_CONFIG: str(hour)}
    rows = [
        SourceRow(3, "u", "a", now - hour),
        SourceRow(1, "u", "b", now + hour),
        SourceRow(2, "u", "c", now + hour + 1),
    ]
    check_times(Path("log.csv"), rows[:2], ahead, now)  # exactly at the limit: the broker takes it
    check_times(Path("log.csv"), rows, {}, now)  # no limit known: nothing to check
    with pytest.raises(ValueError, match=r"log\.csv:2: event time \d+ ms is 1\.0 h ahead .* 1 row\(s\) are: nothing"):
        check_times(Path("log.csv"), rows, ahead, now)
    late = [SourceRow(5, "u", "a", now + 2 * hour), SourceRow(4, "u", "b", now + 3 * hour)]
    with pytest.raises(ValueError, match=r"log\.csv:4: .* 2 row\(s\)"):  # the first line, not the newest time
        check_times(Path("log.csv"), late, ahead, now)
    behind = {BEHIND_LIMIT_CONFIG: str(24 * hour), AHEAD_LIMIT_CONFIG: str(hour)}
    old = [SourceRow(2, "u", "a", now - 48 * hour), SourceRow(1, "u", "b", now)]
    with pytest.raises(ValueError, match=r"log\.csv:2: event time \d+ ms is 48\.0 h behind .*before\.max\.ms"):
        check_times(Path("log.csv"), old, behind, now)
    check_times(Path("log.csv"), old[1:], behind, now)
    check_times(Path("log.csv"), old, {BEHIND_LIMIT_CONFIG: str(2**63 - 1)}, now)  # Kafka's default: none
