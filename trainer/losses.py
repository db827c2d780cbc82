"""Retrieval losses and sampling corrections, as pure tensor functions.

Rule kept explicit here: an impression without a click is **not** a retrieval negative (it
is a ranking signal). Retrieval negatives are other items of the batch, popularity-sampled
items and, where available, hard negatives (retrieved but not shown).
"""

from __future__ import annotations

import torch


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
            subtracted from every logit (Yi et al. 2019, sampling-bias correction).
        same_item: ``[B, M]`` bool, True where a column holds the same item as the row's
            positive; such columns other than the positive itself are masked out.

    Returns:
        The mean cross-entropy.
    """
    if log_q is not None:
        logits = logits - log_q.unsqueeze(0)
    if same_item is not None:
        accidental = same_item.clone()
        accidental[torch.arange(logits.shape[0]), positive_cols] = False
        logits = logits.masked_fill(accidental, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, positive_cols)


def popularity_distribution(counts: torch.Tensor, power: float = 0.75) -> torch.Tensor:
    """Sampling probabilities ∝ count^power over rows (rows with count 0 are never drawn)."""
    weights = counts.to(torch.float64).clamp(min=0).pow(power)
    weights[counts <= 0] = 0.0
    total = weights.sum()
    if total <= 0:
        return torch.zeros_like(weights)
    return weights / total


def candidate_log_q(
    click_prob: torch.Tensor, sample_prob: torch.Tensor, n_in_batch: int, n_sampled: int, floor: float = 1e-12
) -> torch.Tensor:
    """log of the expected number of times each candidate enters one batch's candidate set.

    In-batch candidates arrive with the click distribution (``n_in_batch`` draws), extra
    negatives with the sampling distribution (``n_sampled`` draws).
    """
    expected = n_in_batch * click_prob + n_sampled * sample_prob
    return torch.log(expected.clamp(min=floor)).to(torch.float32)
