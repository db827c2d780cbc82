"""``bench freshness --state-users N``: the trainer starts from a seeded checkpoint of N users."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from bench.checkpoint import seeded_checkpoint, seeded_user
from bench.common import SystemOptions, live_system, wait_until
from twotower import checkpoint
from twotower.config import ModelConfig, TrainerConfig
from twotower.events import CatalogItem


def _catalog(n: int, categories: int, dim: int) -> list[CatalogItem]:
    rng = np.random.default_rng(1)
    return [CatalogItem(f"it{j}", f"cat{j % categories}", rng.standard_normal(dim).tolist(), 0) for j in range(n)]


def test_seeded_checkpoint_is_what_the_trainer_would_hold() -> None:
    from trainer.state import TrainerState

    mcfg, tcfg = ModelConfig(), TrainerConfig()
    catalog = _catalog(30, 4, mcfg.content_dim)
    ckpt = seeded_checkpoint(2_000, catalog, mcfg, tcfg, seed=3)

    assert ckpt.seq == 1 and ckpt.offsets == {}  # no offsets: every partition is read from the start
    assert ckpt.users.ids == [seeded_user(i) for i in range(2_000)]
    assert ckpt.histories.users == ckpt.users.ids and ckpt.profiles.ids == ckpt.users.ids
    lengths = (ckpt.histories.offsets[1:] - ckpt.histories.offsets[:-1]).unique().tolist()
    assert lengths == [mcfg.history_len]
    assert set(ckpt.histories.vocab) <= {item.item_id for item in catalog}
    assert len(ckpt.hard_negatives.shown.keys) == 0

    # the items and categories are exactly what a trainer from scratch makes of the catalogue
    fresh = TrainerState(mcfg, tcfg)
    for item in catalog:
        fresh.apply_catalog(item)
    state = TrainerState.from_checkpoint(ckpt, tcfg)
    assert state.categories == fresh.categories
    assert ckpt.items.ids == [item.item_id for item in catalog] and not ckpt.items.emb.any()
    assert state.catalog["it7"][0] == fresh.catalog["it7"][0]
    np.testing.assert_array_equal(state.catalog["it7"][1], fresh.catalog["it7"][1])
    assert len(state.histories[seeded_user(5)]) == mcfg.history_len
    # the same seed gives the same users (the rows do not depend on the clock)
    again = seeded_checkpoint(2_000, catalog, mcfg, tcfg, seed=3)
    assert again.users.emb.equal(ckpt.users.emb)


@pytest.mark.integration
def test_trainer_resumes_the_seeded_state(kafka_bootstrap: str, redis_url: str) -> None:
    from bench.freshness import VersionTracker
    from twotower.snapshots import SnapshotLayout, SnapshotStore

    n = 2_000
    opts = SystemOptions(
        catalog=100,
        categories=5,
        users=6,
        warm_clicks=3,
        background_rate=0.0,
        state_users=n,
        env_overrides={"TWOTOWER_TRAINER__CHECKPOINT_INTERVAL_S": "1"},
        ready_timeout_s=90.0,
    )
    warm = {f"user{i}" for i in range(opts.users)}
    with live_system(opts, env={"KAFKA_BOOTSTRAP": kafka_bootstrap, "REDIS_URL": redis_url}) as system:
        state_dir = system.cfg.trainer.state_dir

        def trained() -> checkpoint.Checkpoint | None:
            system.check_alive()
            ckpt = checkpoint.load(state_dir)
            if ckpt is None or ckpt.seq <= 1:
                return None
            lengths = dict(
                zip(
                    ckpt.histories.users,
                    (ckpt.histories.offsets[1:] - ckpt.histories.offsets[:-1]).tolist(),
                    strict=True,
                )
            )
            return ckpt if all(lengths.get(user) == opts.warm_clicks for user in warm) else None

        ckpt = wait_until(trained, 60.0, "a trainer checkpoint with the warm users")
        store = SnapshotStore(redis.Redis.from_url(system.redis_url), SnapshotLayout(system.cfg.redis.key_prefix))

        trained_rows = {u: row.numpy().tobytes() for u, row in zip(ckpt.users.ids, ckpt.users.emb, strict=True)}

        def published() -> VersionTracker | None:
            # the warm users' rows as that checkpoint has them (nobody clicks after the warm-up),
            # whichever write carried them: with row updates a full checkpoint whose rows a row
            # update already published adds no version of its own
            tracker = VersionTracker(store)
            return tracker if all(tracker.users.get(u) == trained_rows[u] for u in warm) else None

        tracker = wait_until(published, 30.0, "the published chain to hold that checkpoint's warm rows")
        store.redis.close()
        system.read_logs()
        described = system.describe()
        trainer_log = (system.workdir / "logs" / "trainer.log").read_text()

    # the trainer resumed the seeded users (nobody clicked as them: rows unchanged) ...
    seeded = seeded_checkpoint(n, _catalog(opts.catalog, 5, 0), system.cfg.model, system.cfg.trainer, seed=opts.seed)
    rows = dict(zip(ckpt.users.ids, ckpt.users.emb, strict=True))
    assert all(rows[user].equal(seeded.users.emb[i]) for i, user in enumerate(seeded.users.ids))
    assert ckpt.histories.offsets[-1] >= n * system.cfg.model.history_len
    assert "resumed from checkpoint seq 1 (0 offsets)" in trainer_log
    # ... and, having no offsets for the bench's topics, read them from the start: every warm
    # click was learned (the wait above), and the offsets now name the bench's events topic
    events = f"{system.cfg.kafka.topic_prefix}events"
    assert (
        sum(off for key, off in ckpt.offsets.items() if key.startswith(f"{events}:")) == opts.users * opts.warm_clicks
    )
    assert {f"it{j}" for j in range(opts.catalog)} <= set(ckpt.items.ids)
    # the published chain holds the seeded users' rows, as the trainer has them
    for i in (0, 777, n - 1):
        user = seeded_user(i)
        assert tracker.users[user] == rows[user].numpy().tobytes()
    assert warm <= set(tracker.users)
    assert described["state_users"] == n and described["seeded_state"]["users"] == n
    assert described["seeded_state"]["history_entries"] == n * system.cfg.model.history_len
    assert system.checkpoints and all(c.took_s >= 0 and c.next_s >= 1.0 for c in system.checkpoints)
    assert any(v.trainer_seq > 1 for v in system.publishes) and system.publishes[0].trainer_seq == 1


def test_freshness_cli_has_the_option() -> None:
    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, ["freshness", "--help"], terminal_width=200)
    assert result.exit_code == 0 and "--state-users" in result.output
