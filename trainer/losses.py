"""Retrieval losses and sampling corrections, as pure tensor functions.

Rule kept explicit here: an impression without a click is **not** a retrieval negative (it
is a ranking signal: the item was good enough to be retrieved and shown, which is exactly what
a retrieval model should not be taught to avoid). Retrieval negatives are other items of the
batch, popularity-sampled items and, where available, hard negatives (items the retriever
returned for the request but that were not shown).

Every objective below works on the same ``[B, M]`` logit matrix (user rows x candidate
columns, one positive column per row) and takes the same corrections:

* ``log_q`` (sampling-bias correction, Yi et al. 2019) is subtracted from every logit before
  the loss, as TensorFlow Recommenders does for any loss;
* columns holding the row's positive item other than the positive column itself
  (accidental hits) are removed from the row's negatives.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

LOSSES = ("softmax", "bce", "pairwise_hinge", "pairwise_logistic")
"""The objectives :func:`retrieval_loss` knows."""


def _per_row(log_q: torch.Tensor) -> torch.Tensor:
    """``log_q`` as rows to subtract from ``[B, M]`` logits: ``[M]`` is the same for every row."""
    return log_q if log_q.dim() == 2 else log_q.unsqueeze(0)


def _corrected(
    logits: torch.Tensor,
    positive_cols: torch.Tensor,
    log_q: torch.Tensor | None,
    same_item: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logQ-corrected logits, each row's positive logit ``[B]`` and its negatives mask ``[B, M]``."""
    if log_q is not None:
        logits = logits - _per_row(log_q)
    rows = torch.arange(logits.shape[0])
    negatives = torch.ones_like(logits, dtype=torch.bool)
    if same_item is not None:
        negatives &= ~same_item
    negatives[rows, positive_cols] = False
    return logits, logits[rows, positive_cols], negatives


def sampled_softmax_loss(
    logits: torch.Tensor,
    positive_cols: torch.Tensor,
    log_q: torch.Tensor | None = None,
    same_item: torch.Tensor | None = None,
) -> torch.Tensor:
    """Listwise softmax over candidate columns with logQ correction and accidental-hit removal.

    Args:
        logits: ``[B, M]`` user-candidate scores (already divided by the temperature).
        positive_cols: ``[B]`` column of each row's positive.
        log_q: ``[M]`` log of the expected count of each candidate in a batch's sample; it is
            subtracted from every logit (Yi et al. 2019, sampling-bias correction). ``[B, M]``:
            one per row (a row's own hard negatives are in the set with another probability).
        same_item: ``[B, M]`` bool, True where a column holds the same item as the row's
            positive; such columns other than the positive itself are masked out.

    Returns:
        The mean cross-entropy.
    """
    if log_q is not None:
        logits = logits - _per_row(log_q)
    if same_item is not None:
        accidental = same_item.clone()
        accidental[torch.arange(logits.shape[0]), positive_cols] = False
        logits = logits.masked_fill(accidental, float("-inf"))
    return F.cross_entropy(logits, positive_cols)


def _mean_over_negatives(values: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Per row, the mean of ``values`` over its negatives (0 for a row without negatives)."""
    n = negatives.sum(dim=1).clamp(min=1)
    return torch.where(negatives, values, torch.zeros_like(values)).sum(dim=1) / n


def bce_loss(
    logits: torch.Tensor,
    positive_cols: torch.Tensor,
    log_q: torch.Tensor | None = None,
    same_item: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pointwise binary cross-entropy: the positive labelled 1, every negative column 0.

    Each row contributes ``-log sigmoid(s⁺) + mean_neg(-log sigmoid(-s⁻))``: the negatives of a row share one
    unit of weight, so the positive is not drowned by the hundreds of negatives of a batch.

    Args:
        logits: ``[B, M]`` scores (cosine / temperature).
        positive_cols: ``[B]`` column of each row's positive.
        log_q: ``[M]`` log expected candidate counts, subtracted from the logits.
        same_item: ``[B, M]`` accidental-hit mask (see :func:`sampled_softmax_loss`).

    Returns:
        The mean over rows.
    """
    logits, pos, negatives = _corrected(logits, positive_cols, log_q, same_item)
    return (F.softplus(-pos) + _mean_over_negatives(F.softplus(logits), negatives)).mean()


def pairwise_hinge_loss(
    logits: torch.Tensor,
    positive_cols: torch.Tensor,
    log_q: torch.Tensor | None = None,
    same_item: torch.Tensor | None = None,
    margin: float = 1.0,
) -> torch.Tensor:
    """Triplet hinge: ``mean_neg max(0, margin - (s⁺ - s⁻))`` per row, averaged over rows.

    Args:
        logits: ``[B, M]`` scores (cosine / temperature).
        positive_cols: ``[B]`` column of each row's positive.
        log_q: ``[M]`` log expected candidate counts, subtracted from the logits.
        same_item: ``[B, M]`` accidental-hit mask.
        margin: in logit units (a cosine margin divided by the temperature).
    """
    logits, pos, negatives = _corrected(logits, positive_cols, log_q, same_item)
    return _mean_over_negatives(F.relu(margin - (pos.unsqueeze(1) - logits)), negatives).mean()


def pairwise_logistic_loss(
    logits: torch.Tensor,
    positive_cols: torch.Tensor,
    log_q: torch.Tensor | None = None,
    same_item: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logistic triplet (BPR): ``mean_neg -log sigmoid(s⁺ - s⁻)`` per row, averaged over rows.

    Args:
        logits: ``[B, M]`` scores (cosine / temperature).
        positive_cols: ``[B]`` column of each row's positive.
        log_q: ``[M]`` log expected candidate counts, subtracted from the logits.
        same_item: ``[B, M]`` accidental-hit mask.
    """
    logits, pos, negatives = _corrected(logits, positive_cols, log_q, same_item)
    return _mean_over_negatives(F.softplus(-(pos.unsqueeze(1) - logits)), negatives).mean()


def retrieval_loss(
    name: str,
    logits: torch.Tensor,
    positive_cols: torch.Tensor,
    log_q: torch.Tensor | None = None,
    same_item: torch.Tensor | None = None,
    margin: float = 1.0,
) -> torch.Tensor:
    """The objective ``name`` (one of :data:`LOSSES`) on the same candidate logits.

    Raises:
        ValueError: an unknown loss name.
    """
    if name == "softmax":
        return sampled_softmax_loss(logits, positive_cols, log_q, same_item)
    if name == "bce":
        return bce_loss(logits, positive_cols, log_q, same_item)
    if name == "pairwise_hinge":
        return pairwise_hinge_loss(logits, positive_cols, log_q, same_item, margin)
    if name == "pairwise_logistic":
        return pairwise_logistic_loss(logits, positive_cols, log_q, same_item)
    raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")


def info_nce_loss(view_a: torch.Tensor, view_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE between two views of the same items (row i of each is item i).

    Each item's other view is its positive; the other items' views in the batch are negatives
    (the self-supervised objective of Yao et al. 2021 on the item tower).

    Args:
        view_a: ``[N, dim]`` unit vectors of the first view.
        view_b: ``[N, dim]`` unit vectors of the second view.
        temperature: softmax temperature.
    """
    logits = view_a @ view_b.T / temperature
    labels = torch.arange(view_a.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def popularity_distribution(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """Sampling probabilities ∝ count^power over rows (rows with count 0 are never drawn)."""
    weights = counts.to(torch.float64).clamp(min=0).pow(power)
    weights[counts <= 0] = 0.0
    total = weights.sum()
    if total <= 0:
        return torch.zeros_like(weights)
    return weights / total


def sample_with_replacement(probs: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` indices drawn with replacement from ``probs`` (non-negative, not all zero): by the
    inverse of the cumulative distribution, so any number of categories works
    (``torch.multinomial`` refuses more than 2^24, fewer rows than a table of tens of millions
    of items has). Indices of probability 0 are never drawn."""
    cdf = probs.to(torch.float64).cumsum(0)
    draws = torch.rand(n, dtype=torch.float64, generator=generator) * cdf[-1]
    picked = torch.searchsorted(cdf, draws, right=True)  # the first index whose cdf exceeds the draw
    beyond = picked >= len(cdf)  # a draw rounded up to the total: the last row that can be drawn
    if bool(beyond.any()):
        picked[beyond] = int((probs > 0).nonzero()[-1])
    return picked


def candidate_log_inclusion(
    click_prob: torch.Tensor,
    sample_prob: torch.Tensor,
    n_in_batch: int,
    n_sampled: int,
    floor: float = 1e-12,
    hard_prob: torch.Tensor | None = None,
    n_hard: int = 0,
) -> torch.Tensor:
    """log of the probability that each candidate is in one batch's (deduplicated) candidate set.

    The set holds each item at most once, so the Horvitz-Thompson estimate of the softmax
    denominator, ``sum over the set of exp(s) / pi``, needs the inclusion probability
    ``pi = 1 - (1 - p_click)^B (1 - p_pop)^n_sampled (1 - p_hard)^n_hard`` (independent draws),
    not the expected count: the two agree for rare items (``pi ~ expected count``), but an item
    that is in nearly every batch has ``pi ~ 1`` (no correction) where the expected count would
    keep penalising it the more popular it is.
    """
    log_miss = n_in_batch * torch.log1p(-click_prob.clamp(max=1 - 1e-12))
    log_miss = log_miss + n_sampled * torch.log1p(-sample_prob.clamp(max=1 - 1e-12))
    if hard_prob is not None and n_hard:
        log_miss = log_miss + n_hard * torch.log1p(-hard_prob.clamp(max=1 - 1e-12))
    return torch.log((-torch.expm1(log_miss)).clamp(min=floor)).to(torch.float32)


def candidate_log_q(
    click_prob: torch.Tensor,
    sample_prob: torch.Tensor,
    n_in_batch: int,
    n_sampled: int,
    floor: float = 1e-12,
    hard_prob: torch.Tensor | None = None,
    n_hard: int = 0,
) -> torch.Tensor:
    """log of the expected number of times each candidate enters one batch's candidate set.

    In-batch candidates arrive with the click distribution (``n_in_batch`` draws), extra
    negatives with the popularity sampling distribution (``n_sampled`` draws) and hard
    negatives with the hard-negative distribution (``n_hard`` draws): ``hard_prob`` is the
    frequency of the item among all retrieved-but-not-shown records seen so far, the
    user-independent estimate of how often the hard-negative stream offers it.
    """
    expected = n_in_batch * click_prob + n_sampled * sample_prob
    if hard_prob is not None and n_hard:
        expected = expected + n_hard * hard_prob
    return torch.log(expected.clamp(min=floor)).to(torch.float32)
