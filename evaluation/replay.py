"""The replay core: a generator that scores every post-warm-up event, then learns from it.

:func:`prequential` is pure with respect to I/O (River's progressive validation is the
model): it yields a :class:`Warmed` marker once the warm-up is learned, then one
:class:`Step` per evaluated event, *before* any policy learns from that event. The caller
(:func:`run` here, or the CLI shell) turns steps into metrics, progress and files.

Per evaluated event ``(u, i, t)``, in this order:

1. if ``t`` falls on a later UTC day than the previous event, every policy's
   ``end_of_day`` runs on the previous day's events (warm-up events of that day included,
   as the nightly job reads the whole day);
2. the world's clock moves to ``t`` (trailing popularity expires) and every policy's
   ``advance(t)`` publishes what is due;
3. every policy recommends ``recall_k`` items; the world fills short lists from trailing
   popularity; the step is yielded;
4. the world observes the event (history, seen items, popularity), then every policy learns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from evaluation.metrics import PolicyMetrics, Series, hit
from evaluation.policies import ALSNightly, ItemKNNStream, Policy, PopularityPolicy
from evaluation.protocol import Event, Protocol, World, check_sorted, utc_day, warmup_size
from evaluation.variants import parse_policy, with_overrides

log = logging.getLogger(__name__)

POLICIES = ("popularity_7d", "als_nightly", "itemknn_stream", "two_tower_nightly", "two_tower_streaming")
"""The policies of a default run, in report order."""
EXTRA_POLICIES = ("two_tower_mind_nightly", "two_tower_mind_streaming")
"""Variants run on request: the two-tower policies with the MIND multi-interest user tower."""


@dataclass(frozen=True)
class Warmed:
    """Yielded once, after every policy has bootstrapped on the warm-up."""

    warmup_events: int
    seconds: float


@dataclass(frozen=True)
class Step:
    """One scored event (yielded before anyone learns from it)."""

    index: int
    """Position of the event in the sorted log."""
    event: Event
    day: int
    cold_item: bool
    new_user: bool
    recs: dict[str, list[str]]
    """Policy name → its top ``recall_k`` list (after the fallback fill)."""
    fallback: dict[str, int] = field(default_factory=dict)
    """Policy name → how many items of its list the fallback supplied."""


def prequential(events: Sequence[Event], policies: Sequence[Policy], protocol: Protocol) -> Iterator[Warmed | Step]:
    """Replay ``events`` (sorted by time) through ``policies`` under ``protocol``.

    Raises:
        ValueError: events out of order, duplicate policy names, or no policies.
    """
    check_sorted(events)
    names = [p.name for p in policies]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"need at least one policy and unique names, got {names}")
    started = time.perf_counter()
    world = World(protocol)
    n_warm = warmup_size(len(events), protocol.warmup_fraction)
    warmup = events[:n_warm]
    for event in warmup:
        world.observe(event)
    for policy in policies:
        policy.bootstrap(warmup, world)
    day = utc_day(warmup[-1].ts_ms) if warmup else None
    day_events: list[Event] = [e for e in warmup if utc_day(e.ts_ms) == day] if warmup else []
    yield Warmed(n_warm, time.perf_counter() - started)

    n = protocol.recall_k
    for index in range(n_warm, len(events)):
        event = events[index]
        user, item, now = event
        today = utc_day(now)
        if day is not None and today != day:
            for policy in policies:
                policy.end_of_day(day, day_events, world)
            day_events = []
        day = today
        world.advance(now)
        for policy in policies:
            policy.advance(now, world)
        recs: dict[str, list[str]] = {}
        fallback: dict[str, int] = {}
        for policy in policies:
            recs[policy.name], fallback[policy.name] = world.fill(policy.recommend(user, now, world, n), user, n)
        yield Step(index, event, today, world.is_cold_item(item, now), world.is_new_user(user, now), recs, fallback)
        world.observe(event)
        for policy in policies:
            policy.learn(event, world)
        day_events.append(event)


def make_policies(
    names: Sequence[str],
    protocol: Protocol,
    model_cfg: Any = None,
    trainer_cfg: Any = None,
    bootstrap_epochs: int | None = None,
    item_side: Any = None,
) -> list[Policy]:
    """Build policies by name; two-tower policies of the same model share one warm start.

    Args:
        names: policy names from :data:`POLICIES` or :data:`EXTRA_POLICIES`; a two-tower policy may
            carry settings, ``two_tower_streaming[loss=bce]`` (see :mod:`evaluation.variants`).
        protocol: the protocol (seed, publish interval).
        model_cfg: :class:`twotower.config.ModelConfig`; default: the loaded configuration's.
        trainer_cfg: :class:`twotower.config.TrainerConfig`; default: the loaded configuration's,
            with ``seed`` replaced by the protocol's.
        bootstrap_epochs: warm-up epochs of the two-tower (default
            :data:`evaluation.two_tower.DEFAULT_BOOTSTRAP_EPOCHS`).
        item_side: item id → :class:`evaluation.catalog.ItemSide`, the catalogue the two-tower
            policies read (each item's record at its first event); default none.

    Raises:
        ValueError: an unknown name, or a bad setting.
    """
    parsed = [parse_policy(n) for n in names]
    unknown = [n for n, _ in parsed if n not in POLICIES + EXTRA_POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; choose from {', '.join(POLICIES + EXTRA_POLICIES)}")
    out: list[Policy] = []
    warm_starts: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
    for spec, (name, overrides) in zip(names, parsed, strict=True):
        if overrides and not name.startswith("two_tower"):
            raise ValueError(f"{spec}: settings apply to the two-tower policies only")
        if name == "popularity_7d":
            out.append(PopularityPolicy())
        elif name == "als_nightly":
            out.append(ALSNightly(seed=protocol.seed))
        elif name == "itemknn_stream":
            out.append(ItemKNNStream())
        else:
            from evaluation.two_tower import DEFAULT_BOOTSTRAP_EPOCHS, TwoTowerPolicy, WarmStart
            from twotower.config import load_config

            if model_cfg is None or trainer_cfg is None:
                cfg = load_config()
                model_cfg = model_cfg or cfg.model
                trainer_cfg = trainer_cfg or cfg.trainer.model_copy(update={"seed": protocol.seed})
            tower = "mind" if "_mind_" in name else "default"
            key = (tower, tuple(sorted(overrides.items())))
            if key not in warm_starts:  # policies differing only in streaming share one bootstrap
                mcfg, tcfg = with_overrides(model_cfg, trainer_cfg, overrides)
                # the protocol's days are UTC days (the state keeps a history's overflow by them)
                tcfg = tcfg.model_copy(update={"schedule_timezone": "UTC"})
                if tower == "mind":
                    if "user_tower" not in type(mcfg).model_fields:
                        raise ValueError("this model has no MIND user tower (model.user_tower)")
                    mcfg = mcfg.model_copy(update={"user_tower": "mind"})
                epochs = DEFAULT_BOOTSTRAP_EPOCHS if bootstrap_epochs is None else bootstrap_epochs
                warm_starts[key] = WarmStart(mcfg, tcfg, epochs, item_side)
            out.append(TwoTowerPolicy(spec, name.endswith("_streaming"), warm_starts[key], protocol.publish_every_ms))
    return out


@dataclass
class Result:
    """Everything a replay measured."""

    protocol: Protocol
    metrics: dict[str, PolicyMetrics]
    series: Series
    n_events: int
    warmup_events: int
    n_catalogue: int
    n_users: int
    seconds: float
    warmup_seconds: float
    policies: dict[str, dict[str, Any]]

    def to_json(self, n_bins: int = 20) -> dict[str, Any]:
        return {
            "protocol": self.protocol.as_dict(),
            "log": {
                "events": self.n_events,
                "warmup_events": self.warmup_events,
                "evaluated_events": self.n_events - self.warmup_events,
                "items": self.n_catalogue,
                "users": self.n_users,
            },
            "results": {name: m.summary(self.n_catalogue) for name, m in self.metrics.items()},
            "policies": self.policies,
            "hr_over_time": self.series.binned(n_bins),
            "runtime_s": {"total": round(self.seconds, 1), "warmup": round(self.warmup_seconds, 1)},
        }


def run(
    events: Sequence[Event],
    policies: Sequence[Policy],
    protocol: Protocol,
    on_step: Callable[[Warmed | Step], None] | None = None,
) -> Result:
    """Drive :func:`prequential` to the end and accumulate metrics (``on_step`` sees every item)."""
    started = time.perf_counter()
    metrics = {p.name: PolicyMetrics(protocol.k, protocol.recall_k) for p in policies}
    series = Series()
    warm_s = 0.0
    n_warm = 0
    try:
        for step in prequential(events, policies, protocol):
            if isinstance(step, Warmed):
                n_warm, warm_s = step.warmup_events, step.seconds
            else:
                hits: dict[str, float] = {}
                for name, recs in step.recs.items():
                    rank = metrics[name].update(
                        step.event.item, recs, step.cold_item, step.new_user, step.fallback.get(name, 0)
                    )
                    hits[name] = hit(rank, protocol.k)
                series.add(step.day, hits)
            if on_step is not None:
                on_step(step)
    finally:
        for policy in policies:
            close = getattr(policy, "close", None)
            if close is not None:
                close()
    items = {e.item for e in events}
    users = {e.user for e in events}
    return Result(
        protocol=protocol,
        metrics=metrics,
        series=series,
        n_events=len(events),
        warmup_events=n_warm,
        n_catalogue=len(items),
        n_users=len(users),
        seconds=time.perf_counter() - started,
        warmup_seconds=warm_s,
        policies={p.name: p.describe() for p in policies},
    )
