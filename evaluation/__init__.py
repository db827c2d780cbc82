"""Prequential (test-then-train) replay evaluation of recommendation policies on interaction logs.

Layout, core first:

* :mod:`evaluation.protocol`: the fixed protocol settings, the event type, UTC days, and the
  :class:`~evaluation.protocol.World` (what every policy may see at once: histories, seen
  items, first sightings, trailing popularity, the popularity fallback).
* :mod:`evaluation.policies`: the baselines (``popularity_7d``, ``als_nightly``,
  ``itemknn_stream``) and the policy interface.
* :mod:`evaluation.two_tower`: the two-tower policies, driving the production trainer,
  publisher and retriever code with event time as the clock and no Kafka or Redis.
* :mod:`evaluation.replay`: the core, a generator that yields one scored step per event.
* :mod:`evaluation.metrics`: accumulators turning steps into HR@K, Recall, NDCG, coverage.
* :mod:`evaluation.cli` and :mod:`evaluation.plot`: the shell (progress bar, JSON, PNG).
"""
