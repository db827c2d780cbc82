"""The trainer's model state and the one learning step both training modes share.

:class:`TrainerState` holds the dense towers, the user and item ID tables, the item catalogue
(category and content features), user profiles, the recent history the user tower pools and
the recent requests' retrieved-but-not-shown items (hard negatives).
:meth:`TrainerState.learn` takes clicks in event order and performs one step:

* ``dense=False`` (streaming): only the touched ID rows move (row-wise Adagrad); the dense
  weights do not take part in autograd at all, so they stay bit-identical, whatever the loss,
  user tower or negatives.
* ``dense=True`` (nightly): rows move the same way and the towers take an Adam step (plus the
  optional self-supervised item-tower loss).

Candidates of a step: the batch's clicked items (in-batch negatives for each other) plus one
extra negative per click, mixed by ``trainer.negatives_popularity_ratio`` between items drawn
∝ count^0.75 and hard negatives. **An impression without a click is not a retrieval
negative**: impressions only tell which items of a request were shown, so that the items the
retriever returned but that were *not shown* can serve as hard negatives for that request's
clicks (:meth:`TrainerState.observe_impression`).
"""

from __future__ import annotations

import datetime as dt
import logging
import zlib
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np
import torch

from trainer.days import DayStarts, date_of, dates_around, day_starts_ms
from trainer.id_table import IdTable
from trainer.losses import (
    candidate_log_inclusion,
    candidate_log_q,
    info_nce_loss,
    popularity_distribution,
    retrieval_loss,
    sample_with_replacement,
)
from trainer.pooling import history_columns, pool_views, pooling_matrix
from twotower.checkpoint import Catalog, Checkpoint, HardNegatives, Histories, Profiles, gather_rows
from twotower.columns import Ragged
from twotower.config import ModelConfig, TrainerConfig, stored_model_config
from twotower.events import IMPRESSION, CatalogItem, Interaction, Profile
from twotower.model import (
    TwoTower,
    context_matrix,
    example_age_days,
    fit_features,
    history_pools,
    history_tensor,
    load_dense_state,
)

log = logging.getLogger(__name__)

MS_PER_DAY = 86_400_000
OVERFLOW_DEPTH = 2
"""A history's overflow keeps at most this many times ``history_len`` entries per user, for the
nightly retrains of at most this many days (in steady state one is pending: yesterday's, until
it runs; what is dropped beyond, a nightly reads back from Kafka)."""
NIGHTLY_DONE = "nightly_done"
"""The checkpoint's ``extra`` key of :attr:`TrainerState.nightly_done` (the dates retrained)."""
OVERFLOW_SINCE = "overflow_since_ms"
"""The checkpoint's ``extra`` key of :attr:`TrainerState.overflow_since_ms`."""
NEVER = np.iinfo(np.int64).max
"""A time no day starts after (an empty slot of a row in a column-wise comparison)."""
PRUNE_ROWS = 65_536
"""Users whose overflow is pruned in one column-wise step (bounds its temporary arrays)."""
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


SSL_GROUPS = 3
"""Feature groups of the item tower the self-supervised views mask: ID row, category, content."""


@dataclass
class RequestNegatives:
    """What one request showed and what the retriever returned for it but did not show."""

    shown: set[str] = field(default_factory=set)
    not_shown: dict[str, None] = field(default_factory=dict)
    """Insertion-ordered set of retrieved-but-not-shown item ids: the request's hard negatives."""


@dataclass(frozen=True)
class StepResult:
    """What one learning step reports (detached numbers only)."""

    loss: float
    examples: int
    user_rows_updated: int
    item_rows_updated: int


class TrainerState:
    """Model, ID tables, catalogue, profiles and histories of the trainer.

    Catalogue, profiles and histories are mappings kept as columns (:class:`CatalogColumns`,
    :class:`ProfileColumns`, :class:`HistoryColumns`): a checkpoint copies arrays instead of
    walking millions of Python objects, and a resume fills them without building any.

    Args:
        model_cfg: tower shapes.
        trainer_cfg: learning rates, admission, seed.
    """

    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig) -> None:
        self.model_cfg = model_cfg
        self.tcfg = trainer_cfg
        with torch.random.fork_rng():
            torch.manual_seed(trainer_cfg.seed)
            self.model = TwoTower(model_cfg)
        self.model.requires_grad_(False)
        self.model.eval()
        admission, max_pending = trainer_cfg.admission_min_count, trainer_cfg.admission_max_pending
        self.users = IdTable(model_cfg.id_dim, admission, max_pending=max_pending)
        self.items = IdTable(model_cfg.id_dim, admission, max_pending=max_pending)
        self.catalog = CatalogColumns(model_cfg.content_dim)
        self.categories: dict[str, int] = {}
        self.profiles = ProfileColumns(model_cfg.profile_dim)
        self.histories = HistoryColumns(model_cfg.history_len)
        self.history_overflow = HistoryColumns(OVERFLOW_DEPTH * model_cfg.history_len)
        """What later clicks pushed out of :attr:`histories` that a nightly retrain may still need
        (see :meth:`remember`), newest ``OVERFLOW_DEPTH · history_len`` per user."""
        self.overflow_since_ms = 0
        """Event time from which :attr:`history_overflow` has kept what it should (a state resumed
        from a checkpoint written before it: that checkpoint's event time)."""
        self._day_start = DayStarts(trainer_cfg.schedule_timezone)
        self.removed_items: list[tuple[int, str]] = []
        self.nightly_done: list[str] = []
        self.seq = 0
        self.dense_version = 0
        self.event_time_ms = 0
        self.dense_optimizer = torch.optim.Adam(self.model.parameters(), lr=trainer_cfg.nightly_lr)
        self.generator = torch.Generator().manual_seed(trainer_cfg.seed)
        self.requests: OrderedDict[str, RequestNegatives] = OrderedDict()
        """Recent requests (LRU, ``trainer.hard_negative_requests``) → shown / not-shown items."""
        self.hard_counts: dict[str, int] = {}
        """Item → times it was recorded as retrieved-but-not-shown (the hard-negative frequency)."""
        self.hard_total = 0

    # --- side information --------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        """The sequence number the next checkpoint will carry; changed rows are stamped with it."""
        return self.seq + 1

    def category_index(self, category: str) -> int:
        """Index of a category; new ones take the next free slot, then hash into the vocabulary."""
        idx = self.categories.get(category)
        if idx is None:
            n = self.model_cfg.n_categories
            idx = len(self.categories) + 1 if len(self.categories) < n else 1 + zlib.crc32(category.encode()) % n
            self.categories[category] = idx
        return idx

    def apply_catalog(self, item: CatalogItem) -> None:
        """A catalogue item gets a row at once (zero ID part: its vector comes from content)."""
        cat = self.category_index(item.category)
        self.catalog[item.item_id] = (cat, fit_features(item.features, self.model_cfg.content_dim))
        row = self.items.add(item.item_id, item.ts_ms, self.next_seq)
        self.items.updated_seq[row] = self.next_seq

    def catalog_differs(self, item: CatalogItem) -> bool:
        """Whether applying ``item`` would change the state's catalogue (a new item, or another
        category or other content features than the state holds for it)."""
        held = self.catalog.get(item.item_id)
        if held is None:
            return True
        cat = self.categories.get(item.category)
        return cat != held[0] or not np.array_equal(fit_features(item.features, self.model_cfg.content_dim), held[1])

    def apply_profile(self, profile: Profile) -> None:
        self.profiles[profile.user_id] = fit_features(profile.features, self.model_cfg.profile_dim)

    def remember(self, user_id: str, item_id: str, ts_ms: int) -> None:
        """Append a click to the user's pooled history (bounded).

        The entry that falls out goes to :attr:`history_overflow` if it is from a day before the
        user's newest click: the nightly retrain of a day starts each user from the newest
        ``history_len`` clicks before that day, and those a streaming trainer's state pushed out
        are kept there until :meth:`nightly_trained` says no nightly needs them. (An entry of the
        newest click's own day is followed by ``history_len`` newer ones before any later day.)
        """
        dropped = self.histories.append(user_id, item_id, ts_ms)
        if dropped is None:
            return
        if dropped[1] >= self._day_start(ts_ms):  # the newest click is at least as new as this one
            newest = self.histories.newest_ms(user_id)
            if newest is None or dropped[1] >= self._day_start(newest):
                return
        overflow = self.history_overflow
        if not overflow.is_full(user_id):
            overflow.append(user_id, *dropped)
            return
        # A full row: late clicks can leave entries in it that no nightly needs any more, and
        # dropping its oldest could drop one that yesterday's still does. Keep what the nightlies
        # not run yet of the newest click's day and the day before need (at most the row).
        newest = max(self.event_time_ms, ts_ms, self.histories.newest_ms(user_id) or ts_ms)
        days = dates_around(date_of(newest, self.tcfg.schedule_timezone), OVERFLOW_DEPTH - 1, 0)
        entries = sorted([*overflow[user_id], dropped], key=itemgetter(1))
        history = self.histories.get(user_id, [])
        kept = newest_before(entries, history, self._unretrained_day_starts(days), self.model_cfg.history_len)
        if kept:
            overflow[user_id] = kept
        else:
            del overflow[user_id]

    def pre_day_history(self, user_id: str, day_start_ms: int) -> list[tuple[str, int]]:
        """The user's newest ``history_len`` clicks before ``day_start_ms`` that the state holds
        (its history and what overflowed from it), oldest first."""
        held = [*self.history_overflow.get(user_id, ()), *self.histories.get(user_id, ())]
        held.sort(key=itemgetter(1))  # stable: clicks of one time keep their order
        return [pair for pair in held if pair[1] < day_start_ms][-self.model_cfg.history_len :]

    def nightly_trained(self, date: str) -> None:
        """Record the nightly retrain of ``date`` (ISO, in ``trainer.schedule_timezone``) and drop
        from :attr:`history_overflow` what no nightly still to run can need: an entry is kept
        while it is among a user's newest ``history_len`` before the start of a day not retrained
        yet: from the day before ``date`` to ``OVERFLOW_DEPTH`` days after it, and the day of the
        state's event time and the day before (both: a rerun of an old date must not prune what
        the stream's nightlies need, nor one click from the future, which moves the event time,
        what the next one needs)."""
        self.nightly_done.append(date)
        near = dates_around(dt.date.fromisoformat(date), OVERFLOW_DEPTH - 1, OVERFLOW_DEPTH)
        # and the days around the stream's, which a rerun of an old date must not prune
        now = dates_around(date_of(self.event_time_ms, self.tcfg.schedule_timezone), OVERFLOW_DEPTH - 1, 0)
        starts = self._unretrained_day_starts(sorted({*near, *now}))
        self.history_overflow.keep_newest_before(starts, self.model_cfg.history_len, self.histories)

    def holds_pre_day_histories(self, day_start_ms: int) -> bool:
        """Whether histories and overflow hold every user's newest ``history_len`` clicks before
        the day that starts at ``day_start_ms``: the overflow has kept what it should since
        before the day began (a state resumed from a checkpoint without it: since after that
        checkpoint's event time), the day has not been retrained (its nightly prunes what only
        it needed), and the stream has not reached the second day after it (until then no
        pruning or full row drops what that day's nightly needs)."""
        if self.overflow_since_ms >= day_start_ms:
            return False
        tz = self.tcfg.schedule_timezone
        day = date_of(day_start_ms, tz)
        if day.isoformat() in self.nightly_done:
            return False
        return (date_of(self.event_time_ms, tz) - day).days <= 1

    def _unretrained_day_starts(self, dates: Iterable[dt.date]) -> list[int]:
        """The starts (epoch ms) of those of ``dates`` whose nightly has not run."""
        done = set(self.nightly_done)
        return day_starts_ms((d for d in dates if d.isoformat() not in done), self.tcfg.schedule_timezone)

    def observe_impression(self, impression: Interaction) -> None:
        """Record what a request showed and what it retrieved but did not show (hard negatives).

        The impression itself is **not** a retrieval negative: it only marks its item as shown
        (a shown item is never a hard negative of its request). Its ``context["retrieved"]``
        lists item ids the retriever returned for the request beyond the shown slate; those
        become hard negatives for the clicks of the same ``request_id``; ids the state knows
        neither as a row nor from the catalogue are left out (the retriever cannot have served
        them, and their counts would never be dropped). Requests are kept in a bounded LRU
        (``trainer.hard_negative_requests``). Records of other types are ignored, so a caller
        may pass every interaction.
        """
        capacity = self.tcfg.hard_negative_requests
        if impression.type != IMPRESSION or capacity <= 0 or not impression.request_id:
            return
        entry = self.requests.get(impression.request_id)
        if entry is None:
            entry = self.requests[impression.request_id] = RequestNegatives()
            while len(self.requests) > capacity:
                self.requests.popitem(last=False)
        else:
            self.requests.move_to_end(impression.request_id)
        entry.shown.add(impression.item_id)
        if impression.item_id in entry.not_shown:  # listed as not shown by an earlier impression
            del entry.not_shown[impression.item_id]
            self._count_hard(impression.item_id, -1)
        retrieved = impression.context.get("retrieved", ())
        if not isinstance(retrieved, (list, tuple)):
            return
        counts = self.hard_counts
        items, catalog = self.items, self.catalog
        for item_id in retrieved:
            if (
                isinstance(item_id, str)
                and item_id not in entry.shown
                and item_id not in entry.not_shown
                and (item_id in items or item_id in catalog)  # an item the retriever can have served
            ):
                entry.not_shown[item_id] = None
                counts[item_id] = counts.get(item_id, 0) + 1
                self.hard_total += 1

    def _count_hard(self, item_id: str, delta: int) -> None:
        count = self.hard_counts.get(item_id, 0) + delta
        if count > 0:
            self.hard_counts[item_id] = count
        else:
            self.hard_counts.pop(item_id, None)
        self.hard_total = max(0, self.hard_total + delta)

    def hard_negatives(self, request_id: str) -> list[str]:
        """The retrieved-but-not-shown items of a recent request (empty if unknown)."""
        entry = self.requests.get(request_id) if request_id else None
        return list(entry.not_shown) if entry is not None else []

    def item_side(self, item_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Category indices ``[n]`` and content ``[n, content_dim]`` of items (zeros if unknown)."""
        cats, content = self.catalog.side(item_ids)
        return torch.from_numpy(cats), torch.from_numpy(content)

    def item_vectors(self, item_ids: Sequence[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Item-tower outputs for ``item_ids`` (from ``rows`` if given, else the table's rows)."""
        if rows is None:
            rows = self.items.gather(self.items.rows(list(item_ids)))
        cats, content = self.item_side(item_ids)
        return self.model.item(rows, cats, content)

    def pooled_history(self, histories: Sequence[Sequence[tuple[str, int]]], now_ms: Sequence[int]) -> torch.Tensor:
        """``[B, history_pools · dim]`` pooled input of each history (oldest first; no gradient):
        the same weights as the differentiable path (:func:`trainer.pooling.pooling_matrix`)."""
        unique = sorted({item for hist in histories for item, _ in hist})
        if not unique:
            return torch.zeros(len(histories), history_pools(self.model_cfg) * self.model_cfg.dim)
        with torch.no_grad():
            return pool_views(pooling_matrix(unique, histories, now_ms, self.model_cfg), self.item_vectors(unique))

    def history_batch(self, histories: Sequence[Sequence[tuple[str, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """MIND input: ``[B, history_len, dim]`` item vectors, newest first, and the ``[B, history_len]``
        mask (no gradient). ``histories`` are oldest first, as the trainer stores them."""
        length = self.model_cfg.history_len
        recent = [[item for item, _ in hist][::-1][:length] for hist in histories]
        unique = sorted({item for hist in recent for item in hist})
        if not unique:
            return history_tensor(np.zeros((0, self.model_cfg.dim), dtype=np.float32), [[]] * len(recent), length)
        with torch.no_grad():
            vecs = self.item_vectors(unique).numpy()
        pos = {item: i for i, item in enumerate(unique)}
        return history_tensor(vecs, [[pos[item] for item in hist] for hist in recent], length)

    def profile_matrix(self, user_ids: Sequence[str]) -> torch.Tensor:
        return torch.from_numpy(self.profiles.matrix(user_ids))

    # --- learning ----------------------------------------------------------------------
    def observe_clicks(self, clicks: Iterable[Interaction]) -> list[tuple[Interaction, list[tuple[str, int]]]]:
        """Count IDs and advance histories in event order; each click with the history before it."""
        out = []
        seq = self.next_seq
        for click in clicks:
            self.users.observe(click.user_id, click.ts_ms, seq)
            self.items.observe(click.item_id, click.ts_ms, seq)
            before = self.histories.get(click.user_id, [])
            self.remember(click.user_id, click.item_id, click.ts_ms)
            self.event_time_ms = max(self.event_time_ms, click.ts_ms)
            out.append((click, before))
        return out

    def learn(
        self,
        examples: Sequence[tuple[Interaction, Sequence[tuple[str, int]]]],
        dense: bool,
        row_lr: float | None = None,
    ) -> StepResult:
        """One step of the configured retrieval loss over in-batch and extra negatives.

        Candidates are the batch's clicked items plus one extra negative per click (popularity
        and hard negatives mixed by ``trainer.negatives_popularity_ratio``, see
        :meth:`_candidates`); every logit gets the logQ correction (``trainer.logq_correction``).
        Impressions without a click never enter as negatives.

        Args:
            examples: clicks with the history each user had just before it (see :meth:`observe_clicks`).
            dense: also step the towers (nightly); otherwise only ID rows move (streaming) and the
                dense weights stay bit-identical.
            row_lr: Adagrad step size of the rows; default ``trainer.nightly_row_lr`` for dense steps,
                ``trainer.stream_lr`` for streaming ones.
        """
        if not examples:
            return StepResult(0.0, 0, 0, 0)
        if row_lr is None:
            row_lr = self.tcfg.nightly_row_lr if dense else self.tcfg.stream_lr
        mcfg, tcfg = self.model_cfg, self.tcfg
        seq = self.next_seq
        clicks = [c for c, _ in examples]
        user_ids = [c.user_id for c in clicks]
        user_rows = self.users.rows(user_ids)
        profiles = self.profile_matrix(user_ids)
        age = None
        if mcfg.example_age:
            # the trainer's clock: the newest event time it has seen (≥ the end of a nightly day)
            now_ms = max(self.event_time_ms, max(c.ts_ms for c in clicks))
            age = example_age_days([c.ts_ms for c in clicks], now_ms)
        # each click's context: the time of its event, and its own context["features"]
        context = context_matrix(mcfg, [c.ts_ms for c in clicks], [c.context for c in clicks])
        cand_ids, positive_cols, log_q = self._candidates(clicks)
        histories = [h for _, h in examples]
        # trainer.history_gradient: history items join the item columns, so the pooled mean is differentiable
        grad_history = tcfg.history_gradient and dense and not self.model.multi_interest
        item_ids = history_columns(cand_ids, histories) if grad_history else cand_ids
        cand_rows = self.items.rows(item_ids)

        # Leaf tensors for the rows: gradients land here and nowhere else unless dense=True.
        u_leaf = self.users.gather(user_rows).requires_grad_(True)
        i_leaf = self.items.gather(cand_rows).requires_grad_(True)
        u_in = u_leaf
        if dense and tcfg.user_row_dropout > 0:
            # trainer.user_row_dropout: some clicks are learned as a user without a row would be served
            keep = torch.rand(len(clicks), generator=self.generator) >= tcfg.user_row_dropout
            u_in = u_leaf * keep.to(u_leaf.dtype).unsqueeze(1)
        self.model.requires_grad_(dense)
        self.model.train(dense)
        try:
            cats, content = self.item_side(item_ids)
            all_vecs = self.model.item(i_leaf, cats, content)
            item_vecs = all_vecs[: len(cand_ids)]
            if self.model.multi_interest:
                history, mask = self.history_batch(histories)
                interests, active = self.model.user(u_in, profiles, history, mask, age, context)
                logits = self.model.score_interests(interests, active, item_vecs, positive_cols)
            else:
                now = [c.ts_ms for c in clicks]
                if grad_history:
                    pooled = pool_views(pooling_matrix(item_ids, histories, now, mcfg), all_vecs)
                else:
                    pooled = self.pooled_history(histories, now)
                user_vecs = self.model.user(u_in, profiles, pooled, age, context)
                logits = self.model.score(user_vecs, item_vecs)
            loss = retrieval_loss(
                tcfg.loss, logits, positive_cols, log_q, margin=tcfg.pairwise_margin / mcfg.temperature
            )
            total = loss
            if dense and tcfg.ssl_weight > 0:
                total = loss + tcfg.ssl_weight * self._ssl_loss(i_leaf, cats, content)
            if not bool(torch.isfinite(total.detach())):
                # nothing the schema lets in should get here; if something does, it must not
                # turn every row and weight it touches NaN
                log.warning("a step's loss is %s: its %d examples are not learned", float(total.detach()), len(clicks))
                return StepResult(float(loss.detach()), 0, 0, 0)
            if dense:
                self.dense_optimizer.zero_grad(set_to_none=True)
            total.backward()
            if dense:
                self.dense_optimizer.step()
        finally:
            self.model.requires_grad_(False)
            self.model.eval()

        n_users = self._update_rows(self.users, user_rows, u_leaf.grad, row_lr, seq)
        n_items = 0
        if dense or tcfg.stream_item_rows:
            n_items = self._update_rows(self.items, cand_rows, i_leaf.grad, row_lr, seq)
        return StepResult(float(loss.detach()), len(clicks), n_users, n_items)

    def _candidates(self, clicks: Sequence[Interaction]) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        """The candidate columns of a step, each row's positive column and the candidates' log Q
        (``None`` with ``logq_correction = "none"``).

        Columns: the clicked items (deduplicated, so a row never meets its own item as a
        negative: accidental hits are removed by construction), then ``n_hard`` hard negatives
        and ``n_pop`` popularity samples, ``n_hard + n_pop = n_extra = max(len(clicks),
        trainer.min_extra_negatives)``. ``n_hard`` is ``round((1 - negatives_popularity_ratio) · n_extra)``
        capped by the hard negatives the batch's requests have (drawn uniformly without replacement
        when there are more); popularity samples (∝ count^0.75, with replacement) fill the rest.

        log Q of a candidate (``trainer.logq_correction``): ``inclusion`` (default), the log of the
        probability that it is in the batch's deduplicated candidate set,
        ``1 - (1-p_click)^B (1-p_pop)^n_pop (1-p_hard)^n_hard``; ``expected_count``, the log of
        ``B·p_click + n_pop·p_pop + n_hard·p_hard``. ``p_click`` is the item's share of clicks,
        ``p_pop`` its popularity-sampling probability and ``p_hard`` its share of all
        retrieved-but-not-shown records (streaming frequency estimates, as for clicks). For
        another click's hard negatives the hard-negative term treats them as draws from the
        stream of such records (the user-independent approximation); a click's own request's
        hard negatives are in the set whenever the subsample keeps them (``selected``: all of
        them when the pool fits), so their log Q in that click's row is that of
        ``1 - (1 - selected)(1 - pi of the other sources)`` (expected count: ``selected`` plus
        the others'). log Q is then ``[B, M]``, one row per click.
        """
        b = len(clicks)
        counts = self.items.count
        sample_p = popularity_distribution(counts)
        has_pop = bool(sample_p.sum() > 0)
        n_extra = max(b, self.tcfg.min_extra_negatives)
        pool: dict[str, None] = {}
        for click in clicks:
            for item_id in self.hard_negatives(click.request_id):
                pool[item_id] = None
        hard_target = round((1.0 - self.tcfg.negatives_popularity_ratio) * n_extra) if has_pop else n_extra
        hard = list(pool) if hard_target > 0 else []
        if len(hard) > hard_target:
            pick = torch.randperm(len(hard), generator=self.generator)[:hard_target].sort().values.tolist()
            hard = [hard[i] for i in pick]
        n_pop = n_extra - len(hard) if has_pop else 0
        sampled_rows = sample_with_replacement(sample_p, n_pop, self.generator).tolist() if n_pop else []
        cand_ids: list[str] = []
        col: dict[str, int] = {}
        for item in [c.item_id for c in clicks] + hard + [self.items.ids[r] for r in sampled_rows]:
            if item is not None and item not in col:
                col[item] = len(cand_ids)
                cand_ids.append(item)
        cand_rows = self.items.rows(cand_ids)
        positive_cols = torch.tensor([col[c.item_id] for c in clicks])
        total = counts.sum().clamp(min=1).to(torch.float64)
        known = cand_rows >= 0
        click_p = torch.zeros(len(cand_ids), dtype=torch.float64)
        samp_p = torch.zeros(len(cand_ids), dtype=torch.float64)
        click_p[known] = counts[cand_rows[known]].to(torch.float64) / total
        samp_p[known] = sample_p[cand_rows[known]]
        # A candidate's source offered it at least once: an item clicked in the batch without a
        # count (not admitted yet, or its row expired) or a hard negative whose count expired
        # would otherwise get q = 0, and the floor's log(1e-12) would add 27.6 to its logit.
        click_p[positive_cols] = click_p[positive_cols].clamp(min=1.0 / float(total))
        hard_p = None
        if hard:
            hard_total = max(self.hard_total, 1)
            hard_p = torch.tensor([self.hard_counts.get(i, 0) / hard_total for i in cand_ids], dtype=torch.float64)
            hard_cols = torch.tensor([col[i] for i in hard])
            hard_p[hard_cols] = hard_p[hard_cols].clamp(min=1.0 / hard_total)
        mode = self.tcfg.logq_correction
        if mode == "none":
            return cand_ids, positive_cols, None
        log_q_fn = candidate_log_inclusion if mode == "inclusion" else candidate_log_q
        log_q = log_q_fn(click_p, samp_p, b, n_pop, hard_prob=hard_p, n_hard=len(hard))
        if not hard:
            return cand_ids, positive_cols, log_q
        # A click's own request's hard negatives are not draws from the stream of such records:
        # each is in the set whenever the subsample keeps it (all of them when the pool fits),
        # whatever its share of that stream. With the stream's share, their log Q was far too
        # small, and the correction pushed down the very items the retriever ranks first for
        # the user (helper 26's measurement: 10x the popularity bias logQ removes, at B=4).
        selected = min(1.0, hard_target / len(pool))
        others = log_q_fn(click_p, samp_p, b, n_pop).to(torch.float64).exp()  # without the hard stream
        if mode == "inclusion":  # pi = 1 - (1 - selected)(1 - pi of the other sources)
            own = torch.log(1.0 - (1.0 - selected) * (1.0 - others).clamp(min=0.0))
        else:  # expected count: the other sources' plus the selection's
            own = torch.log(others + selected)
        per_row = log_q.unsqueeze(0).repeat(b, 1)
        chosen = set(hard)
        for i, click in enumerate(clicks):
            cols = [col[item] for item in self.hard_negatives(click.request_id) if item in chosen]
            if cols:
                at = torch.tensor(cols)
                per_row[i, at] = own[at].to(per_row.dtype)
        return cand_ids, positive_cols, per_row

    def _ssl_loss(self, id_rows: torch.Tensor, cats: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
        """Self-supervised InfoNCE on the item tower (Yao et al. 2021) over the step's candidate items.

        Two views of each item: a random non-empty proper subset of the feature groups (ID row,
        category, content) is kept in the first view and the complementary groups in the second
        (complementary feature masking), and content dropout (``trainer.ssl_dropout``) on both.
        A view without its ID row is what a brand-new item looks like, so the loss pulls an item's
        content-only vector towards its ID-based one: the long tail benefits.
        """
        n = id_rows.shape[0]
        if n < 2:
            return torch.zeros(())
        g = self.generator
        keep_mask = torch.randint(1, 2**SSL_GROUPS - 1, (n,), generator=g)
        keep = ((keep_mask.unsqueeze(1) >> torch.arange(SSL_GROUPS)) & 1).bool()  # [n, 3]
        p = self.tcfg.ssl_dropout

        def view(kept: torch.Tensor) -> torch.Tensor:
            drop = (torch.rand(content.shape, generator=g) >= p).to(content.dtype) / (1.0 - p)
            return self.model.item(
                id_rows * kept[:, 0:1].to(id_rows.dtype),
                torch.where(kept[:, 1], cats, torch.zeros_like(cats)),
                content * kept[:, 2:3].to(content.dtype) * drop,
            )

        return info_nce_loss(view(keep), view(~keep), self.tcfg.ssl_temperature)

    @staticmethod
    def _update_rows(table: IdTable, rows: torch.Tensor, grad: torch.Tensor | None, lr: float, seq: int) -> int:
        """Sum gradients of repeated rows, then one Adagrad step per distinct row."""
        if grad is None:
            return 0
        known = rows >= 0
        if not known.any():
            return 0
        unique, inverse = torch.unique(rows[known], return_inverse=True)
        summed = torch.zeros(unique.shape[0], grad.shape[1]).index_add_(0, inverse, grad[known])
        table.adagrad_update(unique, summed, lr, seq)
        return int(unique.shape[0])

    def expire(self, now_ms: int) -> list[str]:
        """Expire stale user and item rows (``trainer.row_ttl_days``; none when unset), with the
        histories of their users and of users without a row who clicked nothing since; returns
        expired item IDs (recorded for deltas)."""
        if self.tcfg.row_ttl_days is None:
            return []
        ttl_ms = int(self.tcfg.row_ttl_days * MS_PER_DAY)
        seq = self.next_seq
        for user in self.users.expire(now_ms, ttl_ms, seq):
            self.histories.pop(user, None)
            self.history_overflow.pop(user, None)
        # users not admitted (trainer.admission_min_count > 1) have a history but no row to expire
        stale = self.histories.stale_users(now_ms - ttl_ms) if self.tcfg.admission_min_count > 1 else []
        for user in stale:
            if user not in self.users:
                del self.histories[user]
                self.history_overflow.pop(user, None)
        gone = self.items.expire(now_ms, ttl_ms, seq)
        for item in gone:
            self.hard_total -= self.hard_counts.pop(item, 0)
        self.removed_items.extend((seq, item) for item in gone)
        del self.removed_items[: max(0, len(self.removed_items) - 100_000)]
        return gone

    # --- checkpoints -------------------------------------------------------------------
    def to_checkpoint(self, offsets: dict[str, int], extra: dict | None = None) -> Checkpoint:
        """Everything needed to resume (and for the publisher to build snapshots).

        The bulky collections leave as columns (see :mod:`twotower.checkpoint`): one pass over
        each, no per-entry tensors.
        """
        users, _ = self.users.to_state()
        items, _ = self.items.to_state()
        catalog, item_rows = self.catalog.to_columns(items.ids)
        cats, content = gather_rows(catalog, item_rows)
        requests = self.requests
        keys = list(requests)
        return Checkpoint(
            **self._serving_fields(),
            users=users,
            items=items,
            item_category=cats,
            item_content=content,
            removed_items=list(self.removed_items),
            offsets=dict(offsets),
            histories=self.histories.to_columns(),
            history_overflow=self.history_overflow.to_columns(),
            profiles=self.profiles.to_columns(),
            catalog=catalog,
            hard_negatives=HardNegatives(
                Ragged.from_lists(keys, [sorted(entry.shown) for entry in requests.values()]),
                Ragged.from_lists(keys, [list(entry.not_shown) for entry in requests.values()]),
                dict(self.hard_counts),
            ),
            extra={
                "dense_optimizer": self.dense_optimizer.state_dict(),
                "category_index": dict(self.categories),
                NIGHTLY_DONE: list(self.nightly_done),
                OVERFLOW_SINCE: self.overflow_since_ms,
                "generator": self.generator.get_state(),
                **(extra or {}),
            },
            item_catalog_row=item_rows,
        )

    def _serving_fields(self) -> dict[str, Any]:
        """What a checkpoint and a row update both carry whole: sequence numbers, towers, the
        category vocabulary, the event-time watermark."""
        return {
            "seq": self.seq,
            "dense_version": self.dense_version,
            "model_config": self.model_cfg.model_dump(),
            "dense": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "categories": sorted(self.categories, key=self.categories.__getitem__),
            "event_time_ms": self.event_time_ms,
        }

    def to_row_update(self, since_seq: int, base_seq: int) -> Checkpoint:
        """What changed for serving after checkpoint ``since_seq``: the ID rows stamped later,
        their items' category and content, the removals after it, the dense weights and the
        category vocabulary (see :func:`twotower.checkpoint.save_row_update`).

        Args:
            since_seq: the ``seq`` of the previous checkpoint or row update.
            base_seq: the ``seq`` of the last full checkpoint.
        """
        items = self.items.changed_since(since_seq)
        cats, content = self.catalog.side(items.ids)
        return Checkpoint(
            **self._serving_fields(),
            users=self.users.changed_since(since_seq),
            items=items,
            item_category=torch.from_numpy(cats),
            item_content=torch.from_numpy(content),
            removed_items=[(seq, item) for seq, item in self.removed_items if seq > since_seq],
            offsets={},
            profiles=Profiles.empty(self.model_cfg.profile_dim),
            catalog=Catalog.empty(self.model_cfg.content_dim),
            base_seq=base_seq,
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, trainer_cfg: TrainerConfig) -> TrainerState:
        """Resume from a checkpoint (the model shape comes from the checkpoint)."""
        state = cls(stored_model_config(ckpt.model_config), trainer_cfg)
        filled = load_dense_state(state.model, ckpt.dense)
        state.model.requires_grad_(False)
        state.model.eval()
        state.users = IdTable.from_state(ckpt.users, trainer_cfg.admission_min_count, trainer_cfg.admission_max_pending)
        state.items = IdTable.from_state(ckpt.items, trainer_cfg.admission_min_count, trainer_cfg.admission_max_pending)
        extra = ckpt.extra
        state.categories = dict(extra.get("category_index", {}))
        mcfg = state.model_cfg
        state.profiles = ProfileColumns.from_columns(ckpt.profiles, mcfg.profile_dim)
        state.catalog = CatalogColumns.from_columns(ckpt.catalog, mcfg.content_dim)
        state.histories = HistoryColumns.from_columns(ckpt.histories, mcfg.history_len)
        state.history_overflow = HistoryColumns.from_columns(ckpt.history_overflow, OVERFLOW_DEPTH * mcfg.history_len)
        state.removed_items = list(ckpt.removed_items)
        state.nightly_done = list(extra.get(NIGHTLY_DONE, []))
        state.overflow_since_ms = int(extra.get(OVERFLOW_SINCE, ckpt.event_time_ms))  # older files: from now
        state.seq = ckpt.seq
        state.dense_version = ckpt.dense_version
        state.event_time_ms = ckpt.event_time_ms
        hard = ckpt.hard_negatives
        for rid, shown, not_shown in zip(hard.shown.keys, hard.shown.lists(), hard.not_shown.lists(), strict=True):
            state.requests[rid] = RequestNegatives(set(shown), dict.fromkeys(not_shown))
        state.hard_counts = dict(hard.counts)
        state.hard_total = sum(state.hard_counts.values())
        if "generator" in extra:
            state.generator.set_state(extra["generator"])
        if "dense_optimizer" in extra:
            state.dense_optimizer.load_state_dict(
                _optimizer_state_without(state.model, extra["dense_optimizer"], filled)
            )
        return state


class _Slots:
    """String key → slot of preallocated columns; freed slots are reused."""

    def __init__(self) -> None:
        self.slot: dict[str, int] = {}
        self.keys: list[str | None] = []
        """Key of each slot (``None``: free)."""
        self.free: list[int] = []

    def __len__(self) -> int:
        return len(self.slot)

    def take(self, key: str) -> tuple[int, bool]:
        """The slot of ``key`` and whether it is new (then the caller fills its columns)."""
        slot = self.slot.get(key)
        if slot is not None:
            return slot, False
        if self.free:
            slot = self.free.pop()
            self.keys[slot] = key
        else:
            slot = len(self.keys)
            self.keys.append(key)
        self.slot[key] = slot
        return slot, True

    def release(self, key: str) -> int:
        slot = self.slot.pop(key)
        self.keys[slot] = None
        self.free.append(slot)
        return slot

    def live(self) -> tuple[list[str], np.ndarray | None]:
        """Keys in slot order and their slots (``None``: every slot up to ``len``, no gaps)."""
        if not self.free:
            return list(self.keys), None  # type: ignore[arg-type]  # no free slot: no None
        slots = np.fromiter((s for s, k in enumerate(self.keys) if k is not None), dtype=np.int64, count=len(self.slot))
        return [self.keys[s] for s in slots.tolist()], slots  # type: ignore[misc]

    def lookup(self, keys: Iterable[str], count: int = -1) -> np.ndarray:
        """Slots of ``keys`` as int64, -1 where unknown."""
        return np.fromiter(map(self.slot.get, keys, repeat(-1)), dtype=np.int64, count=count)

    @classmethod
    def of(cls, keys: list[str]) -> _Slots:
        out = cls()
        out.keys = list(keys)
        out.slot = dict(zip(keys, range(len(keys)), strict=True))
        if len(out.slot) != len(keys):
            raise ValueError("duplicate keys")
        return out


def _grown(array: np.ndarray, needed: int) -> np.ndarray:
    """``array`` with at least ``needed`` rows (doubling; new rows zero)."""
    if needed <= array.shape[0]:
        return array
    out = np.zeros((max(needed, 2 * array.shape[0], 1024), *array.shape[1:]), dtype=array.dtype)
    out[: array.shape[0]] = array
    return out


def _take(array: np.ndarray, slots: np.ndarray | None, n: int) -> torch.Tensor:
    """Copies of the rows ``slots`` (every row below ``n`` when ``None``) as a tensor."""
    return torch.from_numpy(array[:n].copy() if slots is None else array[slots])


def newest_before(
    entries: Sequence[tuple[str, int]], newer: Sequence[tuple[str, int]], starts: Iterable[int], length: int
) -> list[tuple[str, int]]:
    """Those of ``entries`` (in time order) that are among the newest ``length`` before one of
    ``starts``, ``newer``'s entries (all newer than ``entries``) counted first: the rule of
    :meth:`HistoryColumns.keep_newest_before` for one user."""
    times = [ts for _, ts in entries]
    keep: set[int] = set()
    for start in starts:
        room = max(length - sum(ts < start for _, ts in newer), 0)
        end = bisect_left(times, start)
        keep.update(range(max(0, end - room), end))
    return [pair for i, pair in enumerate(entries) if i in keep]


class _SlotKeyed:
    """The key side of the column stores below: which keys have a slot (``self.slots``)."""

    slots: _Slots

    def __len__(self) -> int:
        return len(self.slots)

    def __iter__(self) -> Iterator[str]:
        return (k for k in list(self.slots.keys) if k is not None)

    def __contains__(self, key: object) -> bool:
        return key in self.slots.slot


class HistoryColumns(_SlotKeyed, MutableMapping[str, list[tuple[str, int]]]):
    """User → recent (item id, ts_ms) clicks, oldest first, at most ``length`` (a bounded deque
    per user, kept as columns).

    Each user has a slot: a fixed-width row of item codes (into a vocabulary of item ids) and
    one of event times, left-aligned, plus its length. Times are int32 offsets from ``ts_base``
    (rebased when a time falls outside, int64 if they ever span 2³² ms or more). A checkpoint
    then copies a few arrays, already in the file's form, instead of walking a million deques,
    and a resume fills the arrays in one scatter. Reading a user gives a fresh list; assigning
    keeps the newest ``length`` pairs.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.slots = _Slots()
        self.vocab: list[str] = []
        self.code_of: dict[str, int] = {}
        self._vocab_compacted = 0
        self.codes = np.zeros((0, length), dtype=np.int32)
        self.times = np.zeros((0, length), dtype=np.int32)
        self.ts_base = 0
        self.size = np.zeros(0, dtype=np.int64)

    # --- mapping -----------------------------------------------------------------------
    def __getitem__(self, user: str) -> list[tuple[str, int]]:
        slot = self.slots.slot[user]
        n = int(self.size[slot])
        vocab, base = self.vocab, self.ts_base
        return [
            (vocab[c], base + t)
            for c, t in zip(self.codes[slot, :n].tolist(), self.times[slot, :n].tolist(), strict=True)
        ]

    def __setitem__(self, user: str, pairs: Iterable[tuple[str, int]]) -> None:
        entries = list(pairs)[-self.length :]
        if entries:
            self._fit(min(ts for _, ts in entries), max(ts for _, ts in entries))
        slot = self._slot(user)
        n = len(entries)
        self.codes[slot, :n] = [self._code(item) for item, _ in entries]
        self.times[slot, :n] = [ts - self.ts_base for _, ts in entries]
        self.codes[slot, n:] = 0
        self.times[slot, n:] = 0
        self.size[slot] = n

    def __delitem__(self, user: str) -> None:
        slot = self.slots.release(user)
        self.codes[slot] = 0
        self.times[slot] = 0
        self.size[slot] = 0

    def append(self, user: str, item: str, ts_ms: int) -> tuple[str, int] | None:
        """Add a click to the user's history in its place by event time (after clicks of the same
        time; a late click is not taken for the newest), dropping the oldest beyond ``length``.

        Returns:
            The (item id, ts_ms) the history no longer holds: its oldest entry, or the click
            itself when it is older than every entry of a full history; ``None`` when nothing
            fell out.
        """
        offset = ts_ms - self.ts_base
        if not INT32_MIN <= offset <= INT32_MAX:
            self._fit(ts_ms, ts_ms)
            offset = ts_ms - self.ts_base
        slot = self._slot(user)
        n = int(self.size[slot])
        items, ts = self.codes[slot], self.times[slot]
        pos = n if n == 0 or offset >= ts[n - 1] else int(np.searchsorted(ts[:n], offset, side="right"))
        dropped = None
        if n == self.length:
            if pos == 0:
                return item, ts_ms  # older than every click held: not among the newest
            dropped = self.vocab[int(items[0])], self.ts_base + int(ts[0])
            items[: pos - 1] = items[1:pos]  # drop the oldest
            ts[: pos - 1] = ts[1:pos]
            pos -= 1
        else:
            items[pos + 1 : n + 1] = items[pos:n]
            ts[pos + 1 : n + 1] = ts[pos:n]
            self.size[slot] = n + 1
        items[pos] = self._code(item)
        ts[pos] = offset
        return dropped

    def _fit(self, low_ms: int, high_ms: int) -> None:
        """Make times ``low_ms`` … ``high_ms`` representable: rebase the int32 offsets to the
        middle of everything held plus them, or widen to int64 when that spans 2³² ms or more."""
        if self.times.dtype == np.int64 or (low_ms - self.ts_base >= INT32_MIN and high_ms - self.ts_base <= INT32_MAX):
            return
        n = len(self.slots.keys)
        held = self.times[:n][np.arange(self.length) < self.size[:n, None]]
        if not len(self):  # nothing held: start from these times
            low, high = low_ms, high_ms
        else:
            low = min(low_ms, self.ts_base + int(held.min())) if len(held) else low_ms
            high = max(high_ms, self.ts_base + int(held.max())) if len(held) else high_ms
        if high - low > INT32_MAX - INT32_MIN:
            self.times = self.times.astype(np.int64)
            return
        base = low - INT32_MIN  # low maps to the smallest int32
        self.times = (self.times.astype(np.int64) + (self.ts_base - base)).clip(INT32_MIN, INT32_MAX).astype(np.int32)
        self.ts_base = base

    def newest_ms(self, user: str) -> int | None:
        """Event time of the user's newest entry (``None``: no history)."""
        slot = self.slots.slot.get(user)
        if slot is None or not self.size[slot]:
            return None
        return self.ts_base + int(self.times[slot, int(self.size[slot]) - 1])

    def stale_users(self, before_ms: int) -> list[str]:
        """Users whose newest entry is older than ``before_ms`` (or who hold none), column-wise."""
        n = len(self.slots.keys)
        if not n:
            return []
        size = self.size[:n]
        newest = self.times[:n][np.arange(n), np.maximum(size - 1, 0)].astype(np.int64) + self.ts_base
        keys = self.slots.keys
        return [
            user
            for user in (keys[int(i)] for i in np.flatnonzero((size == 0) | (newest < before_ms)))
            if user is not None
        ]

    def is_full(self, user: str) -> bool:
        """Whether the user's entries fill its row (the next one appended drops the oldest)."""
        slot = self.slots.slot.get(user)
        return slot is not None and int(self.size[slot]) == self.length

    def keep_newest_before(self, starts: Sequence[int], length: int, newer: HistoryColumns) -> None:
        """Keep of each user's entries those among its newest ``length`` before one of ``starts``
        (epoch ms), its entries in ``newer`` counted first (they are all newer than its entries
        here, as a history's are than its overflow's); a user left with none is dropped.

        Column-wise, ``PRUNE_ROWS`` users at a time: no Python step per user or entry.
        """
        users, live = self.slots.live()
        if not users:
            return
        slots = np.arange(len(users)) if live is None else live
        other = newer.slots.lookup(users, len(users))
        col = np.arange(self.length)
        for lo in range(0, len(users), PRUNE_ROWS):
            rows, theirs = slots[lo : lo + PRUNE_ROWS], other[lo : lo + PRUNE_ROWS]
            size = self.size[rows]
            times = self.times[rows].astype(np.int64) + self.ts_base
            valid = col < size[:, None]
            held = theirs >= 0
            newer_times = np.full((len(rows), 1), NEVER)  # the users' entries in ``newer``, NEVER: none
            if held.any():
                them = np.where(held, theirs, 0)
                there = (np.arange(newer.length) < newer.size[them][:, None]) & held[:, None]
                newer_times = np.where(there, newer.times[them].astype(np.int64) + newer.ts_base, NEVER)
            keep = np.zeros_like(valid)
            for start in starts:
                before = (valid & (times < start)).sum(axis=1)  # a prefix: entries are in time order
                room = np.maximum(length - (newer_times < start).sum(axis=1), 0)
                keep |= (col >= (before - room)[:, None]) & (col < before[:, None])
            order = np.argsort(~keep, axis=1, kind="stable")  # kept entries first, in their order
            kept = keep.sum(axis=1)
            left = col < kept[:, None]
            self.codes[rows] = np.where(left, np.take_along_axis(self.codes[rows], order, axis=1), 0)
            self.times[rows] = np.where(left, np.take_along_axis(self.times[rows], order, axis=1), 0)
            self.size[rows] = kept
        for i in np.flatnonzero(self.size[slots] == 0).tolist():
            self.slots.release(users[i])

    def entries(self) -> int:
        """Entries over every history."""
        return int(self.size.sum())

    def _slot(self, user: str) -> int:
        slot, new = self.slots.take(user)
        if new and slot >= self.codes.shape[0]:
            self.codes = _grown(self.codes, slot + 1)
            self.times = _grown(self.times, slot + 1)
            self.size = _grown(self.size, slot + 1)
        return slot

    def _code(self, item: str) -> int:
        code = self.code_of.get(item)
        if code is None:
            code = self.code_of[item] = len(self.vocab)
            self.vocab.append(item)
        return code

    # --- columns -----------------------------------------------------------------------
    def to_columns(self) -> Histories:
        """The histories as checkpoint columns (copies), users in slot order."""
        self._compact_vocab()
        users, slots = self.slots.live()
        n = len(self.slots.keys)
        size = self.size[:n] if slots is None else self.size[slots]
        offsets = np.zeros(len(users) + 1, dtype=np.int64)
        np.cumsum(size, out=offsets[1:])
        items = self.codes[:n] if slots is None else self.codes[slots]
        ts = self.times[:n] if slots is None else self.times[slots]
        if bool((size == self.length).all()):
            codes, times = items.reshape(-1).copy(), ts.reshape(-1).copy()
        else:
            mask = np.arange(self.length) < size[:, None]
            codes, times = items[mask], ts[mask]
        codes_t, times_t = torch.from_numpy(codes), torch.from_numpy(times)
        return Histories(users, torch.from_numpy(offsets), list(self.vocab), codes_t, times_t, self.ts_base)

    def _compact_vocab(self) -> None:
        """Drop item ids no history holds any more once the vocabulary has doubled since the
        last compaction (amortised: items come and go, the vocabulary must not only grow)."""
        if len(self.vocab) < max(2 * self._vocab_compacted, 1024):
            return
        n = len(self.slots.keys)
        mask = np.arange(self.length) < self.size[:n, None]
        used = np.zeros(len(self.vocab), dtype=bool)
        used[self.codes[:n][mask]] = True
        remap = np.cumsum(used, dtype=np.int64) - 1
        self.codes[:n] = np.where(mask, remap[self.codes[:n]], 0)
        self.vocab = [self.vocab[c] for c in np.flatnonzero(used).tolist()]
        self.code_of = dict(zip(self.vocab, range(len(self.vocab)), strict=True))
        self._vocab_compacted = len(self.vocab)

    @classmethod
    def from_columns(cls, hist: Histories, length: int) -> HistoryColumns:
        """Histories from checkpoint columns; longer ones keep their newest ``length`` entries."""
        out = cls(length)
        out.slots = _Slots.of(hist.users)
        n = len(hist.users)
        out.vocab = list(hist.vocab)
        out.code_of = dict(zip(out.vocab, range(len(out.vocab)), strict=True))
        ts_t, out.ts_base = hist.ts_offsets, hist.ts_base
        if ts_t.dtype != torch.int32:  # absolute or int64 times: int32 offsets if they fit
            ts_t, out.ts_base = ts_t + hist.ts_base, 0
            if ts_t.numel() and int(ts_t.max()) - int(ts_t.min()) <= INT32_MAX - INT32_MIN:
                out.ts_base = int(ts_t.min()) - INT32_MIN
                ts_t = (ts_t - out.ts_base).to(torch.int32)
        out.codes = np.zeros((max(n, 1024), length), dtype=np.int32)
        out.times = np.zeros((max(n, 1024), length), dtype=ts_t.numpy().dtype)
        out.size = np.zeros(max(n, 1024), dtype=np.int64)
        offsets = hist.offsets.numpy()
        lengths = np.diff(offsets)
        kept = np.minimum(lengths, length)
        out.size[:n] = kept
        codes, ts = hist.codes.numpy(), ts_t.numpy()
        if n and bool((lengths == length).all()):
            out.codes[:n] = codes.reshape(n, length)
            out.times[:n] = ts.reshape(n, length)
        elif len(codes):
            row = np.repeat(np.arange(n), lengths)
            pos = np.arange(len(codes)) - np.repeat(offsets[:-1] + (lengths - kept), lengths)
            keep = pos >= 0
            out.codes[row[keep], pos[keep]] = codes[keep]
            out.times[row[keep], pos[keep]] = ts[keep]
        out._vocab_compacted = len(out.vocab)
        return out


class ProfileColumns(_SlotKeyed, MutableMapping[str, np.ndarray]):
    """User → profile features (``dim`` float32), one row of a matrix per user."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.slots = _Slots()
        self.features = np.zeros((0, dim), dtype=np.float32)

    def __getitem__(self, user: str) -> np.ndarray:
        return self.features[self.slots.slot[user]].copy()

    def __setitem__(self, user: str, features: np.ndarray) -> None:
        slot, new = self.slots.take(user)
        if new:
            self.features = _grown(self.features, slot + 1)
        self.features[slot] = features

    def __delitem__(self, user: str) -> None:
        self.features[self.slots.release(user)] = 0.0

    def matrix(self, user_ids: Sequence[str]) -> np.ndarray:
        """``[len(user_ids), dim]`` profiles (zeros where unknown)."""
        slots = self.slots.lookup(user_ids, len(user_ids))
        known = slots >= 0
        out = np.zeros((len(slots), self.dim), dtype=np.float32)
        out[known] = self.features[slots[known]]
        return out

    def to_columns(self) -> Profiles:
        ids, slots = self.slots.live()
        return Profiles(ids, _take(self.features, slots, len(self.slots.keys)))

    @classmethod
    def from_columns(cls, profiles: Profiles, dim: int) -> ProfileColumns:
        out = cls(dim)
        out.slots = _Slots.of(profiles.ids)
        out.features = profiles.features.numpy().astype(np.float32, copy=True).reshape(len(profiles.ids), dim)
        return out


class CatalogColumns(_SlotKeyed, MutableMapping[str, tuple[int, np.ndarray]]):
    """Item → (category index, content features): a category vector and a content matrix."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.slots = _Slots()
        self.category = np.zeros(0, dtype=np.int64)
        self.content = np.zeros((0, dim), dtype=np.float32)

    def __getitem__(self, item: str) -> tuple[int, np.ndarray]:
        slot = self.slots.slot[item]
        return int(self.category[slot]), self.content[slot].copy()

    def __setitem__(self, item: str, side: tuple[int, np.ndarray]) -> None:
        slot, new = self.slots.take(item)
        if new:
            self.category = _grown(self.category, slot + 1)
            self.content = _grown(self.content, slot + 1)
        self.category[slot], self.content[slot] = side

    def __delitem__(self, item: str) -> None:
        slot = self.slots.release(item)
        self.category[slot] = 0
        self.content[slot] = 0.0

    def side(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Category indices ``[n]`` and content ``[n, dim]`` of items (zeros where unknown)."""
        slots = self.slots.lookup(item_ids, len(item_ids))
        known = slots >= 0
        cats = np.zeros(len(slots), dtype=np.int64)
        content = np.zeros((len(slots), self.dim), dtype=np.float32)
        cats[known] = self.category[slots[known]]
        content[known] = self.content[slots[known]]
        return cats, content

    def to_columns(self, item_ids: Sequence[str] = ()) -> tuple[Catalog, torch.Tensor]:
        """The catalogue as checkpoint columns (copies), and the position in them of each of
        ``item_ids`` (-1: not in the catalogue)."""
        ids, slots = self.slots.live()
        n = len(self.slots.keys)
        position = self.slots.lookup(item_ids, len(item_ids))
        if slots is not None:  # freed slots: renumber to the compacted positions
            renumber = np.full(n + 1, -1, dtype=np.int64)
            renumber[slots] = np.arange(len(slots))
            position = renumber[position]  # -1 stays -1 (the last entry)
        catalog = Catalog(ids, _take(self.category, slots, n), _take(self.content, slots, n))
        return catalog, torch.from_numpy(position)

    @classmethod
    def from_columns(cls, catalog: Catalog, dim: int) -> CatalogColumns:
        out = cls(dim)
        out.slots = _Slots.of(catalog.ids)
        out.category = catalog.category.numpy().astype(np.int64, copy=True)
        out.content = catalog.content.numpy().astype(np.float32, copy=True).reshape(len(catalog.ids), dim)
        return out


def _optimizer_state_without(model: torch.nn.Module, saved: dict, missing: Sequence[str]) -> dict:
    """An Adam state saved for ``model`` minus the parameters ``missing`` (weights that predate
    them, see :func:`twotower.model.load_dense_state`), renumbered for the whole ``model``: the
    saved parameters keep their moments, the missing ones start fresh."""
    if not missing:
        return saved
    names = [name for name, _ in model.named_parameters()]
    old_to_new = [i for i, name in enumerate(names) if name not in set(missing)]
    groups = saved["param_groups"]
    if len(groups) != 1 or len(groups[0]["params"]) != len(old_to_new):
        raise ValueError("the checkpoint's optimizer state does not fit the model's parameters")
    return {
        "state": {old_to_new[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**groups[0], "params": list(range(len(names)))}],
    }
