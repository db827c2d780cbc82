"""Policy variants: ``two_tower_streaming[loss=bce]`` and friends."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_evaluation import TINY_MODEL, synthetic_log, tiny_trainer  # tests/ is on sys.path under pytest

from evaluation.protocol import Protocol
from evaluation.replay import make_policies, run
from evaluation.two_tower import TwoTowerPolicy
from evaluation.variants import parse_policy, split_policies, with_overrides
from twotower.config import ModelConfig, TrainerConfig


def test_specs_parse_and_split_outside_brackets() -> None:
    assert parse_policy("two_tower_streaming") == ("two_tower_streaming", {})
    assert parse_policy(" two_tower_nightly[loss=bce, temperature=0.1] ") == (
        "two_tower_nightly",
        {"loss": "bce", "temperature": "0.1"},
    )
    assert split_policies("popularity_7d, two_tower_streaming[loss=bce,dim=8],itemknn_stream") == [
        "popularity_7d",
        "two_tower_streaming[loss=bce,dim=8]",
        "itemknn_stream",
    ]
    for bad in ("two_tower[", "two_tower_nightly[loss]", "two_tower_nightly[=x]", "Two Tower"):
        with pytest.raises(ValueError):
            parse_policy(bad)


def test_overrides_go_to_the_section_that_has_the_field_and_are_validated() -> None:
    model_in, trainer_in = ModelConfig(), TrainerConfig()
    before = model_in.model_dump(), trainer_in.model_dump()
    assert before[0]["temperature"] != 0.1 and before[1]["loss"] != "bce"
    model, trainer = with_overrides(model_in, trainer_in, {"temperature": "0.1", "loss": "bce"})
    assert model.temperature == 0.1 and trainer.loss == "bce"
    assert (model_in.model_dump(), trainer_in.model_dump()) == before  # the originals are untouched
    with pytest.raises(ValueError, match="unknown setting 'nope'"):
        with_overrides(ModelConfig(), TrainerConfig(), {"nope": "1"})
    with pytest.raises(ValueError, match="loss"):
        with_overrides(ModelConfig(), TrainerConfig(), {"loss": "hinge-ish"})
    with pytest.raises(ValueError, match="dim"):
        with_overrides(ModelConfig(), TrainerConfig(), {"dim": "-3"})


def test_variants_run_side_by_side_and_share_a_bootstrap_only_when_settings_match(tmp_path: Path) -> None:
    names = [
        "two_tower_nightly",
        "two_tower_streaming",
        "two_tower_nightly[loss=bce]",
        "two_tower_streaming[loss=bce]",
        "two_tower_streaming[logq_correction=none,temperature=0.2]",
    ]
    protocol = Protocol(warmup_fraction=0.5, publish_every_s=60)
    policies = make_policies(names, protocol, TINY_MODEL, tiny_trainer(tmp_path), 1)
    assert [p.name for p in policies] == names
    tt = [p for p in policies if isinstance(p, TwoTowerPolicy)]
    assert tt[0].warm_start is tt[1].warm_start and tt[2].warm_start is tt[3].warm_start
    assert tt[0].warm_start is not tt[2].warm_start and tt[4].warm_start is not tt[1].warm_start
    assert tt[2].warm_start.trainer_cfg.loss == "bce" and tt[0].warm_start.trainer_cfg.loss == "softmax"
    assert tt[4].warm_start.model_cfg.temperature == 0.2 and tt[4].warm_start.trainer_cfg.logq_correction == "none"
    assert [p.streaming for p in tt] == [False, True, False, True, True]
    result = run(synthetic_log(days=3, per_day=30), policies, protocol)
    assert set(result.to_json()["results"]) == set(names)
    with pytest.raises(ValueError, match="two-tower policies only"):
        make_policies(["popularity_7d[dim=8]"], protocol, TINY_MODEL, tiny_trainer(tmp_path), 1)
