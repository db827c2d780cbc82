"""Unit tests of the retrieval objectives, the sampling corrections and the negatives mix.

Proofs on tiny problems: every loss moves the clicked item's score up relative to the
negatives; logQ correction removes the sampler's popularity bias in a controlled simulation;
hard negatives (retrieved but not shown) enter a request's candidates, impressions never do.
"""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest
import torch

from producers.simulate import RETRIEVED_KEY, SimulatorDaemon
from trainer.losses import (
    LOSSES,
    bce_loss,
    candidate_log_inclusion,
    candidate_log_q,
    info_nce_loss,
    pairwise_hinge_loss,
    pairwise_logistic_loss,
    retrieval_loss,
)
from trainer.state import TrainerState
from twotower import checkpoint
from twotower.config import Config, ModelConfig, TrainerConfig
from twotower.events import CLICK, IMPRESSION, CatalogItem, Interaction
from twotower.kafka_io import Topics

# --- each loss moves scores the right way -------------------------------------------------------


def _margins(users: torch.Tensor, items: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per row: positive score minus the mean score of the other columns."""
    scores = users @ items.T
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[torch.arange(len(pos)), pos] = False
    return scores[torch.arange(len(pos)), pos] - (scores * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_step_raises_the_positive_relative_to_negatives(name: str) -> None:
    torch.manual_seed(0)
    users = torch.randn(6, 8, requires_grad=True)
    items = torch.randn(10, 8, requires_grad=True)
    pos = torch.tensor([0, 1, 2, 3, 4, 5])
    log_q = torch.log(torch.linspace(0.05, 0.5, 10))
    before = _margins(users.detach(), items.detach(), pos)
    loss = retrieval_loss(name, users @ items.T, pos, log_q, margin=5.0)
    loss.backward()
    with torch.no_grad():
        after = _margins(users - 0.05 * users.grad, items - 0.05 * items.grad, pos)
    assert loss.item() > 0
    assert (after > before).all(), f"{name}: margins {before.tolist()} -> {after.tolist()}"


@pytest.mark.parametrize("name", LOSSES)
def test_each_loss_ignores_accidental_hits(name: str) -> None:
    logits = torch.zeros(2, 4, requires_grad=True)
    pos = torch.tensor([0, 1])
    same = torch.tensor([[True, False, False, True], [False, True, False, False]])  # row 0: col 3 = col 0
    retrieval_loss(name, logits, pos, None, same, margin=1.0).backward()
    assert logits.grad[0, 3] == 0  # a duplicate of the positive is neither pushed down nor up
    assert logits.grad[0, 0] < 0 and logits.grad[0, 1] > 0  # positive up, a real negative down


def test_pointwise_and_pairwise_values() -> None:
    logits = torch.tensor([[3.0, 1.0, -1.0]])
    pos = torch.tensor([0])
    sp = torch.nn.functional.softplus
    assert bce_loss(logits, pos).item() == pytest.approx(
        (sp(-3.0 * torch.ones(1)) + (sp(1.0 * torch.ones(1)) + sp(-1.0 * torch.ones(1))) / 2).item()
    )
    assert pairwise_hinge_loss(logits, pos, margin=1.0).item() == 0.0  # both gaps (2, 4) exceed the margin
    assert pairwise_hinge_loss(logits, pos, margin=3.0).item() == pytest.approx(0.5)  # (1 + 0) / 2
    expected = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-4.0))) / 2
    assert pairwise_logistic_loss(logits, pos).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="unknown loss"):
        retrieval_loss("nope", logits, pos)


def test_info_nce_prefers_matching_views() -> None:
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
    b = torch.nn.functional.normalize(a + 0.1 * torch.randn(8, 16), dim=1)
    assert info_nce_loss(a, b, 0.1) < info_nce_loss(a, b.roll(1, dims=0), 0.1)


def test_inclusion_probability_saturates_where_expected_count_does_not() -> None:
    click = torch.tensor([0.5, 0.001], dtype=torch.float64)
    sample = torch.tensor([0.3, 0.001], dtype=torch.float64)
    incl = candidate_log_inclusion(click, sample, 100, 100).exp()
    count = candidate_log_q(click, sample, 100, 100).exp()
    assert incl[0].item() == pytest.approx(1.0)  # in every batch: no penalty
    assert count[0].item() == pytest.approx(80.0)  # the expected count keeps penalising it
    assert incl[1].item() == pytest.approx(count[1].item(), rel=0.2)  # rare items: the two agree
    hard = torch.tensor([0.0, 0.5], dtype=torch.float64)
    with_hard = candidate_log_inclusion(click, sample, 100, 100, hard_prob=hard, n_hard=10).exp()
    assert with_hard[1] > incl[1]


# --- logQ correction removes the sampler's popularity bias ---------------------------------------


def _popularity_fit(logq: str, n_items: int = 150, steps: int = 120, batch: int = 64) -> tuple[float, float]:
    """Clicks follow a Zipf popularity, identical for every user (equal relevance: the only thing to
    learn is popularity, so the true score of an item is log p_i + const). Returns the slope of the
    learned scores against log p (truth: 1) and the correlation of the error with log p (truth: 0)."""
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, n_items + 1)
    p /= p.sum()
    cfg = ModelConfig(dim=8, id_dim=8, hidden=16, content_dim=0, profile_dim=0, n_categories=1)
    state = TrainerState(
        cfg, TrainerConfig(logq_correction=logq, stream_lr=0.1, stream_item_rows=True, min_extra_negatives=0)
    )
    for i in range(n_items):
        state.apply_catalog(CatalogItem(f"i{i}", "c", [], 0))
    t = 0
    for _ in range(steps):
        clicks = []
        for u, i in zip(rng.integers(10, size=batch), rng.choice(n_items, batch, p=p), strict=True):
            t += 1
            clicks.append(Interaction(f"e{t}", "", f"u{u}", f"i{i}", CLICK, 0, t))
        state.learn([(c, []) for c, _ in state.observe_clicks(clicks)], dense=False)
    ids, users = [f"i{i}" for i in range(n_items)], [f"u{u}" for u in range(10)]
    with torch.no_grad():
        uv = state.model.user(
            state.users.gather(state.users.rows(users)),
            state.profile_matrix(users),
            state.pooled_history([[]] * 10, [0] * 10),
        )
        scores = (uv @ state.item_vectors(ids).T).mean(0).numpy() / cfg.temperature
    seen = state.items.count[state.items.rows(ids)].numpy() >= 5
    log_p = np.log(p[seen])
    slope = float(np.polyfit(log_p, scores[seen], 1)[0])
    error = scores[seen] - log_p
    return slope, float(np.corrcoef(error, log_p)[0, 1])


def test_logq_correction_removes_popularity_bias_of_the_sampler() -> None:
    """Without correction the in-batch/popularity negatives demote popular items (scores grow with
    log p at well under the true rate: an error anti-correlated with popularity); with the
    inclusion-probability correction the learned scores track log p at the true rate; the
    expected-count variant over-corrects."""
    none_slope, none_err = _popularity_fit("none")
    incl_slope, incl_err = _popularity_fit("inclusion")
    count_slope, count_err = _popularity_fit("expected_count")
    assert none_slope < 0.75 and none_err < -0.5  # measured: slope 0.52, error correlation -0.80
    assert abs(incl_slope - 1.0) < 0.2 and abs(incl_err) < 0.3  # measured: 1.00, -0.01
    assert count_slope > 1.2 and count_err > 0.3  # measured: 1.37, 0.60
    assert abs(incl_err) < abs(none_err) and abs(incl_err) < abs(count_err)


# --- hard negatives: retrieved but not shown ------------------------------------------------------


def _state(**trainer: Any) -> TrainerState:
    state = TrainerState(
        ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=2, history_len=5),
        TrainerConfig(**{"stream_item_rows": True, "min_extra_negatives": 0, **trainer}),
    )
    for i in range(30):
        state.apply_catalog(CatalogItem(f"i{i}", f"c{i % 3}", [float(i % 3), 1.0], 0))
    return state


def _impression(request: str, item: str, retrieved: list[str] | None = None, user: str = "u1") -> Interaction:
    context = {"source": "retriever"} if retrieved is None else {"source": "retriever", RETRIEVED_KEY: retrieved}
    return Interaction(f"{request}:{item}:i", request, user, item, IMPRESSION, 0, 1_000, context)


def _click(request: str, item: str, user: str = "u1", ts: int = 1_000) -> Interaction:
    return Interaction(f"{request}:{item}:c", request, user, item, CLICK, 0, ts)


def test_impressions_record_not_shown_items_and_are_never_negatives_themselves() -> None:
    state = _state()
    state.observe_impression(_impression("r1", "i0", ["i5", "i6", "i1"]))
    state.observe_impression(_impression("r1", "i1", ["i5", "i6", "i1"]))  # i1 was shown after all
    assert state.hard_negatives("r1") == ["i5", "i6"]
    assert state.hard_counts == {"i5": 1, "i6": 1} and state.hard_total == 2
    assert state.hard_negatives("unknown") == [] and state.hard_negatives("") == []
    # an impression changes neither the ID tables nor the histories: it is no training example
    assert len(state.users) == 0 and state.histories == {}
    assert int(state.items.count.sum()) == 0
    state.observe_impression(_click("r1", "i0"))  # other record types are ignored
    assert state.hard_negatives("r1") == ["i5", "i6"]


def test_hard_negative_requests_are_a_bounded_lru() -> None:
    state = _state(hard_negative_requests=2)
    for r in ("r1", "r2"):
        state.observe_impression(_impression(r, "i0", ["i9"]))
    state.observe_impression(_impression("r1", "i1", ["i9"]))  # r1 used again: now the newest
    state.observe_impression(_impression("r3", "i0", ["i8"]))
    assert list(state.requests) == ["r1", "r3"]
    off = _state(hard_negative_requests=0)
    off.observe_impression(_impression("r1", "i0", ["i9"]))
    assert off.hard_negatives("r1") == []


def test_clicks_of_a_request_get_its_hard_negatives_mixed_with_popularity_samples() -> None:
    state = _state(negatives_popularity_ratio=0.5)
    state.observe_clicks([_click("warm", f"i{i}", ts=1) for i in range(20)])  # counts for the sampler
    hard = [f"i{i}" for i in range(20, 30)]
    for pos in range(2):
        state.observe_impression(_impression("r1", f"i{pos}", hard))
    clicks = [_click("r1", "i0", ts=1_000)] + [_click("", f"i{k}", user=f"u{k}", ts=1_000) for k in range(1, 8)]
    cand, positive_cols, log_q = state._candidates(clicks)
    extra = cand[len({c.item_id for c in clicks}) :]
    assert len([i for i in extra if i in hard]) == 4  # half of the 8 extra negatives are hard ones
    assert set(cand[:8]) == {c.item_id for c in clicks} and positive_cols.tolist() == list(range(8))
    assert log_q is not None and log_q.shape == (len(clicks), len(cand)) and torch.isfinite(log_q).all()
    # the request's own hard negatives are in the set whenever the subsample keeps one (4 of 10),
    # not with their share of the stream of such records, which other rows still see
    own = [cand.index(i) for i in extra if i in hard]
    assert bool((log_q[0, own].exp() >= 0.399).all()) and bool((log_q[0, own] > log_q[1:, own]).all())
    rest = [j for j in range(len(cand)) if j not in own]
    assert torch.equal(log_q[0, rest], log_q[1, rest])
    only_pop = _state(negatives_popularity_ratio=1.0)
    only_pop.observe_clicks([_click("warm", f"i{i}", ts=1) for i in range(20)])
    only_pop.observe_impression(_impression("r1", "i0", hard))
    cand, _, _ = only_pop._candidates(clicks)
    assert not set(cand) & set(hard)  # ratio 1: popularity negatives only (these items have no clicks)


def test_own_hard_negatives_all_taken_are_not_corrected_at_all() -> None:
    """Kept whatever happens, they are in the set with probability 1 (log Q = 0). With the
    stream's share instead (about 1/catalogue), a streaming micro-batch pushed down the items
    the retriever ranked first for the user: at the true logits the expected gradient on them
    was +0.46 per click against +0.03 with this (helper 26, B=4)."""
    state = _state(negatives_popularity_ratio=0.0)
    state.observe_clicks([_click("warm", f"i{i}", ts=1) for i in range(20)])
    state.observe_impression(_impression("r1", "i0", ["i25", "i26"]))
    clicks = [_click("r1", "i0", ts=1_000), _click("r2", "i1", user="u2", ts=1_000)]
    cand, _, log_q = state._candidates(clicks)
    own = [cand.index("i25"), cand.index("i26")]
    assert log_q is not None and torch.allclose(log_q[0, own], torch.zeros(2), atol=1e-6)
    assert bool((log_q[1, own] < -0.1).all())  # another request's: the stream's share (half each here)
    expected = _state(negatives_popularity_ratio=0.0, logq_correction="expected_count")
    expected.observe_clicks([_click("warm", f"i{i}", ts=1) for i in range(20)])
    expected.observe_impression(_impression("r1", "i0", ["i25", "i26"]))
    cand, _, log_q = expected._candidates(clicks)
    assert log_q is not None and bool((log_q[0, [cand.index("i25"), cand.index("i26")]] >= 0).all())


def test_hard_negatives_fill_only_what_they_have_and_learning_uses_them() -> None:
    state = _state(negatives_popularity_ratio=0.0)
    state.observe_clicks([_click("warm", f"i{i}", ts=1) for i in range(20)])
    state.observe_impression(_impression("r1", "i0", ["i25", "i26"]))
    clicks = [_click("r1", "i0")] + [_click("", f"i{k}", user=f"u{k}") for k in range(1, 6)]
    cand, _, _ = state._candidates(clicks)
    assert {"i25", "i26"} <= set(cand)  # ratio 0 asks for 6 hard ones; the 2 available are used...
    before = state.items.emb[state.items.row("i25")].clone()
    result = state.learn(state.observe_clicks(clicks), dense=False)
    assert result.examples == 6
    assert not torch.equal(state.items.emb[state.items.row("i25")], before)  # ...and pushed as negatives


def test_hard_negative_memory_survives_a_checkpoint(tmp_path) -> None:
    state = _state()
    state.observe_impression(_impression("r1", "i0", ["i5", "i6"]))
    state.seq += 1
    checkpoint.save(tmp_path, state.to_checkpoint({}))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None
    again = TrainerState.from_checkpoint(loaded, state.tcfg)
    assert again.hard_negatives("r1") == ["i5", "i6"] and again.requests["r1"].shown == {"i0"}
    assert again.hard_counts == state.hard_counts and again.hard_total == 2


def test_expiry_forgets_hard_negative_counts_of_expired_items() -> None:
    state = _state(row_ttl_days=1.0)
    state.observe_impression(_impression("r1", "i0", ["i5"]))
    state.observe_clicks([_click("r2", "i7", ts=10 * 86_400_000)])
    gone = state.expire(10 * 86_400_000)
    assert "i5" in gone and state.hard_counts == {} and state.hard_total == 0


def test_ids_no_item_has_are_not_kept_as_hard_negatives() -> None:
    """Their counts were never dropped (expiry only drops items that had rows): one impression
    could grow the state by a thousand ids for good."""
    state = _state()
    state.observe_impression(_impression("r1", "i0", ["i5", "nobody-1", "nobody-2", "i6"]))
    assert state.hard_negatives("r1") == ["i5", "i6"]
    assert state.hard_counts == {"i5": 1, "i6": 1} and state.hard_total == 2


def test_expiry_drops_the_histories_of_users_never_admitted() -> None:
    day = 86_400_000
    state = _state(row_ttl_days=1.0, admission_min_count=2)
    state.observe_clicks([_click(f"r{u}", "i1", user=f"once{u}", ts=day) for u in range(50)])
    state.observe_clicks([_click(f"s{u}", "i2", user="twice", ts=day + u) for u in range(2)])
    assert len(state.histories) == 51 and "twice" in state.users and "once0" not in state.users
    state.observe_clicks([_click("late", "i3", user="once7", ts=3 * day)])  # still clicking
    state.expire(3 * day)
    assert set(state.histories) == {"once7"}  # "twice" went with its row, the rest had no row


def test_a_step_whose_loss_is_not_finite_learns_nothing() -> None:
    state = _state()
    clicks = [_click(f"r{i}", f"i{i}", user=f"u{i}") for i in range(4)]
    examples = state.observe_clicks(clicks)
    rows = state.users.emb.clone()
    with torch.no_grad():
        next(state.model.parameters()).fill_(float("inf"))
    result = state.learn(examples, dense=False)
    assert result.examples == 0 and result.user_rows_updated == 0
    assert torch.equal(state.users.emb, rows)


# --- the simulator writes the retrieved-but-not-shown items ---------------------------------------


def test_simulator_shows_slate_size_and_lists_the_rest_as_retrieved() -> None:
    cfg = Config().with_overrides(
        {"simulator": {"n_users": 5, "n_items": 50, "slate_size": 3, "retriever_url": "http://retriever.test"}}
    )
    asked = []

    def handler(request: httpx.Request) -> httpx.Response:
        k = int(request.url.params["k"])
        asked.append(k)
        return httpx.Response(200, json={"items": [{"item_id": f"i{j}"} for j in range(k)], "version": 3})

    sent: list[Interaction] = []
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        daemon = SimulatorDaemon(cfg, http=http)
        daemon._topics = Topics("")
        daemon._send = lambda topic, record, kind: sent.append(record)  # type: ignore[method-assign]
        daemon._request()
    assert asked == [6]
    impressions = [r for r in sent if r.type == IMPRESSION]
    assert [r.item_id for r in impressions] == ["i0", "i1", "i2"]
    assert all(r.context[RETRIEVED_KEY] == ["i3", "i4", "i5"] for r in impressions)
    assert all(RETRIEVED_KEY not in r.context for r in sent if r.type == CLICK)


def test_streaming_trainer_feeds_impressions_to_the_hard_negative_memory(tmp_path) -> None:
    """The streaming trainer's record loop passes impressions to ``observe_impression`` and trains
    clicks only: the click of the request then meets the request's retrieved-but-not-shown items."""
    from trainer.stream import StreamTrainer

    cfg = Config().with_overrides({"trainer": {"state_dir": str(tmp_path), "negatives_popularity_ratio": 0.0}})
    trainer = StreamTrainer(cfg)
    state = trainer.state = _state(negatives_popularity_ratio=0.0)
    state.observe_clicks([_click("warm", f"i{i}", ts=1) for i in range(20)])
    records = [_impression("r1", "i0", ["i25", "i26"]), _impression("r1", "i1", ["i25", "i26"]), _click("r1", "i0")]
    for offset, record in enumerate(records):
        trainer.merger.push(("events", 0), offset, record.ts_ms, record)
    seen: list[list[str]] = []
    original = state._candidates

    def spy(clicks: list[Interaction]) -> Any:
        out = original(clicks)
        seen.append(out[0])
        return out

    state._candidates = spy  # type: ignore[method-assign]
    trainer._train_ready(force=True)
    assert state.hard_negatives("r1") == ["i25", "i26"]
    assert len(seen) == 1 and len(set(seen[0]) & {"i25", "i26"}) == 1  # one click: one extra negative, a hard one
    assert state.histories["u1"][-1][0] == "i0"  # the click was learned; impressions were not
