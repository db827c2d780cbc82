"""The trainer's model state and the one learning step both training modes share.

:class:`TrainerState` holds the dense towers, the user and item ID tables, the item catalogue
(category and content features), user profiles and the recent history the user tower pools.
:meth:`TrainerState.learn` takes clicks in event order and performs one step:

* ``dense=False`` (streaming): only the touched ID rows move (row-wise Adagrad); the dense
  weights do not take part in autograd at all, so they stay bit-identical.
* ``dense=True`` (nightly): rows move the same way and the towers take an Adam step.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from trainer.id_table import IdTable
from trainer.losses import candidate_log_q, popularity_distribution, sampled_softmax_loss
from twotower.checkpoint import Checkpoint
from twotower.config import ModelConfig, TrainerConfig
from twotower.events import CatalogItem, Interaction, Profile
from twotower.model import TwoTower, decay_weights, fit_features

MS_PER_DAY = 86_400_000


@dataclass(frozen=True)
class StepResult:
    """What one learning step reports (detached numbers only)."""

    loss: float
    examples: int
    user_rows_updated: int
    item_rows_updated: int


class TrainerState:
    """Model, ID tables, catalogue, profiles and histories of the trainer.

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
        self.users = IdTable(model_cfg.id_dim, trainer_cfg.admission_min_count)
        self.items = IdTable(model_cfg.id_dim, trainer_cfg.admission_min_count)
        self.catalog: dict[str, tuple[int, np.ndarray]] = {}
        self.categories: dict[str, int] = {}
        self.profiles: dict[str, np.ndarray] = {}
        self.histories: dict[str, deque[tuple[str, int]]] = {}
        self.removed_items: list[tuple[int, str]] = []
        self.nightly_done: list[str] = []
        self.seq = 0
        self.dense_version = 0
        self.event_time_ms = 0
        self.dense_optimizer = torch.optim.Adam(self.model.parameters(), lr=trainer_cfg.nightly_lr)
        self.generator = torch.Generator().manual_seed(trainer_cfg.seed)

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

    def apply_profile(self, profile: Profile) -> None:
        self.profiles[profile.user_id] = fit_features(profile.features, self.model_cfg.profile_dim)

    def remember(self, user_id: str, item_id: str, ts_ms: int) -> None:
        """Append a click to the user's pooled history (bounded)."""
        hist = self.histories.get(user_id)
        if hist is None:
            hist = self.histories[user_id] = deque(maxlen=self.model_cfg.history_len)
        hist.append((item_id, ts_ms))

    def item_side(self, item_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Category indices ``[n]`` and content ``[n, content_dim]`` of items (zeros if unknown)."""
        cats = torch.zeros(len(item_ids), dtype=torch.int64)
        content = np.zeros((len(item_ids), self.model_cfg.content_dim), dtype=np.float32)
        for i, item_id in enumerate(item_ids):
            side = self.catalog.get(item_id)
            if side is not None:
                cats[i] = side[0]
                content[i] = side[1]
        return cats, torch.from_numpy(content)

    def item_vectors(self, item_ids: Sequence[str], rows: torch.Tensor | None = None) -> torch.Tensor:
        """Item-tower outputs for ``item_ids`` (from ``rows`` if given, else the table's rows)."""
        if rows is None:
            rows = self.items.gather(self.items.rows(list(item_ids)))
        cats, content = self.item_side(item_ids)
        return self.model.item(rows, cats, content)

    def pooled_history(self, histories: Sequence[Sequence[tuple[str, int]]], now_ms: Sequence[int]) -> torch.Tensor:
        """``[B, dim]`` time-decayed mean of each history's item vectors (no gradient)."""
        dim = self.model_cfg.dim
        out = torch.zeros(len(histories), dim)
        unique = sorted({item for hist in histories for item, _ in hist})
        if not unique:
            return out
        with torch.no_grad():
            vecs = self.item_vectors(unique).numpy()
        pos = {item: i for i, item in enumerate(unique)}
        for b, hist in enumerate(histories):
            if not hist:
                continue
            idx = [pos[item] for item, _ in hist]
            ts = np.fromiter((t for _, t in hist), dtype=np.int64, count=len(hist))
            w = decay_weights(ts, now_ms[b], self.model_cfg.history_half_life_s)
            out[b] = torch.from_numpy(w @ vecs[idx])
        return out

    def profile_matrix(self, user_ids: Sequence[str]) -> torch.Tensor:
        out = np.zeros((len(user_ids), self.model_cfg.profile_dim), dtype=np.float32)
        for i, user in enumerate(user_ids):
            prof = self.profiles.get(user)
            if prof is not None:
                out[i] = prof
        return torch.from_numpy(out)

    # --- learning ----------------------------------------------------------------------
    def observe_clicks(self, clicks: Iterable[Interaction]) -> list[tuple[Interaction, list[tuple[str, int]]]]:
        """Count IDs and advance histories in event order; each click with the history before it."""
        out = []
        seq = self.next_seq
        for click in clicks:
            self.users.observe(click.user_id, click.ts_ms, seq)
            self.items.observe(click.item_id, click.ts_ms, seq)
            before = list(self.histories.get(click.user_id, ()))
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
        """One step of sampled softmax with in-batch and popularity negatives and logQ correction.

        Args:
            examples: clicks with the history each user had just before it (see :meth:`observe_clicks`).
            dense: also step the towers (nightly); otherwise only ID rows move (streaming).
            row_lr: Adagrad step size of the rows; default ``trainer.stream_lr``.
        """
        if not examples:
            return StepResult(0.0, 0, 0, 0)
        row_lr = self.tcfg.stream_lr if row_lr is None else row_lr
        seq = self.next_seq
        clicks = [c for c, _ in examples]
        b = len(clicks)
        user_rows = self.users.rows([c.user_id for c in clicks])
        pooled = self.pooled_history([h for _, h in examples], [c.ts_ms for c in clicks])
        profiles = self.profile_matrix([c.user_id for c in clicks])

        # Candidates: the batch's positives plus popularity^0.75 negatives, deduplicated.
        counts = self.items.count
        sample_p = popularity_distribution(counts)
        n_sampled = b if sample_p.sum() > 0 else 0
        sampled_rows = (
            torch.multinomial(sample_p, n_sampled, replacement=True, generator=self.generator).tolist()
            if n_sampled
            else []
        )
        cand_ids: list[str] = []
        col: dict[str, int] = {}
        for item in [c.item_id for c in clicks] + [self.items.ids[r] for r in sampled_rows]:
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
        log_q = candidate_log_q(click_p, samp_p, b, n_sampled)

        # Leaf tensors for the rows: gradients land here and nowhere else unless dense=True.
        u_leaf = self.users.gather(user_rows).requires_grad_(True)
        i_leaf = self.items.gather(cand_rows).requires_grad_(True)
        self.model.requires_grad_(dense)
        self.model.train(dense)
        cats, content = self.item_side(cand_ids)
        item_vecs = self.model.item(i_leaf, cats, content)
        user_vecs = self.model.user(u_leaf, profiles, pooled)
        logits = self.model.score(user_vecs, item_vecs)
        loss = sampled_softmax_loss(logits, positive_cols, log_q)
        if dense:
            self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if dense:
            self.dense_optimizer.step()
        self.model.requires_grad_(False)
        self.model.eval()

        n_users = self._update_rows(self.users, user_rows, u_leaf.grad, row_lr, seq)
        n_items = self._update_rows(self.items, cand_rows, i_leaf.grad, row_lr, seq)
        return StepResult(float(loss.detach()), b, n_users, n_items)

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
        """Expire stale user and item rows; returns expired item IDs (recorded for deltas)."""
        ttl_ms = int(self.tcfg.row_ttl_days * MS_PER_DAY)
        seq = self.next_seq
        for user in self.users.expire(now_ms, ttl_ms, seq):
            self.histories.pop(user, None)
        gone = self.items.expire(now_ms, ttl_ms, seq)
        self.removed_items.extend((seq, item) for item in gone)
        del self.removed_items[: max(0, len(self.removed_items) - 100_000)]
        return gone

    # --- checkpoints -------------------------------------------------------------------
    def to_checkpoint(self, offsets: dict[str, int], extra: dict | None = None) -> Checkpoint:
        """Everything needed to resume (and for the publisher to build snapshots)."""
        users, _ = self.users.to_state()
        items, _ = self.items.to_state()
        cats, content = self.item_side(items.ids)
        return Checkpoint(
            seq=self.seq,
            dense_version=self.dense_version,
            model_config=self.model_cfg.model_dump(),
            dense={k: v.detach().clone() for k, v in self.model.state_dict().items()},
            users=users,
            items=items,
            item_category=cats,
            item_content=content,
            categories=sorted(self.categories, key=self.categories.__getitem__),
            removed_items=list(self.removed_items),
            offsets=dict(offsets),
            event_time_ms=self.event_time_ms,
            histories={u: list(h) for u, h in self.histories.items()},
            extra={
                "dense_optimizer": self.dense_optimizer.state_dict(),
                "category_index": dict(self.categories),
                "nightly_done": list(self.nightly_done),
                "generator": self.generator.get_state(),
                "profiles": {u: torch.from_numpy(p) for u, p in self.profiles.items()},
                "catalog_ids": list(self.catalog),
                "catalog_category": torch.tensor([c for c, _ in self.catalog.values()], dtype=torch.int64),
                "catalog_content": torch.from_numpy(
                    np.stack([f for _, f in self.catalog.values()])
                    if self.catalog
                    else np.zeros((0, self.model_cfg.content_dim), dtype=np.float32)
                ),
                **(extra or {}),
            },
        )

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, trainer_cfg: TrainerConfig) -> TrainerState:
        """Resume from a checkpoint (the model shape comes from the checkpoint)."""
        state = cls(ModelConfig.model_validate(ckpt.model_config), trainer_cfg)
        state.model.load_state_dict(ckpt.dense, strict=True)
        state.model.requires_grad_(False)
        state.model.eval()
        state.users = IdTable.from_state(ckpt.users, trainer_cfg.admission_min_count)
        state.items = IdTable.from_state(ckpt.items, trainer_cfg.admission_min_count)
        extra = ckpt.extra
        state.categories = dict(extra.get("category_index", {}))
        state.profiles = {u: p.numpy() for u, p in extra.get("profiles", {}).items()}
        ids = extra.get("catalog_ids", [])
        cats, content = extra.get("catalog_category"), extra.get("catalog_content")
        state.catalog = {item: (int(cats[i]), content[i].numpy()) for i, item in enumerate(ids)}
        state.histories = {
            u: deque(h, maxlen=state.model_cfg.history_len) for u, h in ckpt.histories.items()
        }
        state.removed_items = list(ckpt.removed_items)
        state.nightly_done = list(extra.get("nightly_done", []))
        state.seq = ckpt.seq
        state.dense_version = ckpt.dense_version
        state.event_time_ms = ckpt.event_time_ms
        if "generator" in extra:
            state.generator.set_state(extra["generator"])
        if "dense_optimizer" in extra:
            state.dense_optimizer.load_state_dict(extra["dense_optimizer"])
        return state
