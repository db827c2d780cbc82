"""The nightly hand-over's row arithmetic and the nightly base (no services)."""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import pytest
import torch

from trainer import handoff, nightly
from trainer.state import TrainerState
from trainer.stream import StateLock
from twotower.config import ModelConfig, TrainerConfig

SMALL_MODEL = ModelConfig(dim=8, id_dim=4, hidden=16, content_dim=4, profile_dim=2, history_len=5)


def _state(rows: dict[str, list[float]], accum: float = 1.0) -> TrainerState:
    state = TrainerState(SMALL_MODEL, TrainerConfig())
    for key, values in rows.items():
        row = state.users.add(key)
        state.users.emb[row] = torch.tensor(values)
        state.users.accum[row] = accum
    return state


def test_row_changes_hands_over_rows_and_accumulators() -> None:
    before = _state({"a": [1, 0, 0, 0], "b": [0, 1, 0, 0]})
    after = copy.deepcopy(before)
    after.users.emb[after.users.row("a")] += torch.tensor([0.5, 0, 0, 0])
    after.users.accum[after.users.row("a")] += 2.0
    row_c = after.users.add("c")
    after.users.emb[row_c] = torch.tensor([0, 0, 3.0, 0])
    after.users.accum[row_c] = 4.0
    keys, emb, accum = handoff.row_changes(before.users, after.users)
    assert keys == ["a", "c"]  # b did not change
    assert torch.equal(emb, torch.tensor([[0.5, 0, 0, 0], [0, 0, 3.0, 0]]))
    assert torch.equal(accum, torch.tensor([2.0, 4.0]))


def test_apply_adds_the_change_to_what_streaming_learned_meanwhile(tmp_path: Path) -> None:
    before = _state({"a": [1, 0, 0, 0], "b": [0, 1, 0, 0]})
    after = copy.deepcopy(before)
    after.users.emb[after.users.row("a")] = torch.tensor([2.0, 0, 0, 0])
    after.users.accum[after.users.row("a")] = 3.0
    running = copy.deepcopy(before)  # streaming moved b meanwhile and met a new user d
    running.users.emb[running.users.row("b")] = torch.tensor([0, 5.0, 0, 0])
    running.users.accum[running.users.row("b")] = 1.5
    running.users.add("d")
    handoff.write(tmp_path, "2024-03-10", before, after)
    assert handoff.merge_pending(running, tmp_path)
    users = running.users
    assert torch.equal(users.emb[users.row("a")], torch.tensor([2.0, 0, 0, 0]))  # the nightly's change
    assert float(users.accum[users.row("a")]) == 3.0
    assert torch.equal(users.emb[users.row("b")], torch.tensor([0, 5.0, 0, 0]))  # streaming's, kept
    assert float(users.accum[users.row("b")]) == 1.5
    assert users.row("d") >= 0 and running.nightly_done == ["2024-03-10"]


def test_rebase_resets_rows_to_the_base_and_unknown_rows_to_zero() -> None:
    nightly = _state({"a": [1, 0, 0, 0], "b": [0, 1, 0, 0]}, accum=2.0)
    base = handoff.base_of(nightly, "2024-03-09")
    streaming = copy.deepcopy(nightly)  # then streaming moves a and adds c
    streaming.users.emb[streaming.users.row("a")] = torch.tensor([9.0, 9, 9, 9])
    streaming.users.accum[streaming.users.row("a")] = 7.0
    row_c = streaming.users.add("c")
    streaming.users.emb[row_c] = torch.tensor([1.0, 1, 1, 1])
    streaming.users.accum[row_c] = 1.0
    assert handoff.rebase(streaming, base) == 2  # a and c; b is already at its base value
    users = streaming.users
    assert torch.equal(users.emb[users.row("a")], torch.tensor([1.0, 0, 0, 0]))
    assert float(users.accum[users.row("a")]) == 2.0
    assert torch.equal(users.emb[users.row("c")], torch.zeros(4)) and float(users.accum[users.row("c")]) == 0.0
    assert handoff.rebase(streaming, base) == 0


def test_load_base_takes_the_newest_base_of_an_earlier_date(tmp_path: Path) -> None:
    state = _state({"a": [1, 0, 0, 0]})
    assert handoff.load_base(tmp_path, "2024-03-10") is None
    handoff.write_base(tmp_path, handoff.base_of(state, "2024-03-09"))
    state.users.emb[0] = torch.tensor([2.0, 0, 0, 0])
    handoff.write_base(tmp_path, handoff.base_of(state, "2024-03-10"))
    later = handoff.load_base(tmp_path, "2024-03-11")
    assert later is not None and later["date"] == "2024-03-10"
    rerun = handoff.load_base(tmp_path, "2024-03-10")  # rerunning the 10th: the base before it
    assert rerun is not None and rerun["date"] == "2024-03-09"
    assert torch.equal(rerun["users"]["emb"], torch.tensor([[1.0, 0, 0, 0]]))
    assert handoff.load_base(tmp_path, "2024-03-09") is None


def test_a_handoff_older_than_the_state_s_dense_weights_is_discarded(tmp_path: Path) -> None:
    """A nightly handed its result to a streaming trainer that stopped before merging it, and a
    later retrain owned the state meanwhile: the old handoff must not go over the newer weights."""
    live = _state({"a": [1, 0, 0, 0]})
    before, after = copy.deepcopy(live), copy.deepcopy(live)
    with torch.no_grad():
        after.model.item.category.weight.fill_(1.0)
    after.users.emb[after.users.row("a")] += 1.0
    handoff.write(tmp_path, "2024-03-10", before, after)
    with torch.no_grad():  # the owning retrain of the 11th
        live.model.item.category.weight.fill_(2.0)
    live.users.emb[live.users.row("a")] += 1.0
    live.dense_version += 1
    live.nightly_done.append("2024-03-11")
    assert handoff.merge_pending(live, tmp_path)  # handled: discarded
    assert float(live.model.item.category.weight[0, 0]) == 2.0
    assert torch.equal(live.users.emb[live.users.row("a")], torch.tensor([2.0, 1, 1, 1]))
    assert live.nightly_done == ["2024-03-11"] and live.dense_version == 1
    handoff.retire(tmp_path)
    assert not (tmp_path / handoff.FILENAME).exists()


def test_a_handoff_stays_until_a_checkpoint_holds_its_merge(tmp_path: Path) -> None:
    """Renamed as it was merged, a trainer that died before its next checkpoint lost the
    nightly for good: the restarted one had neither the merge nor the file."""
    before = _state({"a": [1, 0, 0, 0]})
    after = copy.deepcopy(before)
    after.users.emb[after.users.row("a")] += 1.0
    handoff.write(tmp_path, "2024-03-10", before, after)
    crashed = copy.deepcopy(before)
    assert handoff.merge_pending(crashed, tmp_path) and handoff.pending(tmp_path)
    restarted = copy.deepcopy(before)  # from the checkpoint before the merge
    assert handoff.merge_pending(restarted, tmp_path) and restarted.nightly_done == ["2024-03-10"]
    assert torch.equal(restarted.users.emb[restarted.users.row("a")], torch.tensor([2.0, 1, 1, 1]))
    handoff.retire(tmp_path)  # its checkpoint saved
    assert not handoff.pending(tmp_path) and (tmp_path / handoff.FILENAME).with_suffix(".applied").exists()
    assert handoff.merge_pending(restarted, tmp_path) is False


def test_a_nightly_beside_a_streaming_trainer_waits_for_the_earlier_handoff(tmp_path: Path, monkeypatch) -> None:
    """A second run that read the checkpoint before the first's merge trained from the old dense
    weights, and its handoff was discarded: a day lost, though reported trained."""
    monkeypatch.setattr(nightly, "WAIT_POLL_S", 0.01)
    before = _state({"a": [1, 0, 0, 0]})
    handoff.write(tmp_path, "2024-03-10", before, copy.deepcopy(before))
    streaming = StateLock(tmp_path)
    assert streaming.acquire(blocking=False)
    ours = StateLock(tmp_path)
    result: list[bool] = []
    waiting = threading.Thread(target=lambda: result.append(nightly._wait_for_pending_handoff(tmp_path, ours, None)))
    waiting.start()
    time.sleep(0.2)
    assert waiting.is_alive()  # still waiting: the merge is not in a checkpoint yet
    handoff.retire(tmp_path)  # the streaming trainer merged and checkpointed it
    waiting.join(5)
    assert result == [False]  # the streaming trainer still owns the state

    handoff.write(tmp_path, "2024-03-11", before, copy.deepcopy(before))
    waiting = threading.Thread(target=lambda: result.append(nightly._wait_for_pending_handoff(tmp_path, ours, None)))
    waiting.start()
    time.sleep(0.1)
    streaming.release()  # it stopped before merging: this run owns the state and merges it itself
    waiting.join(5)
    assert result == [False, True] and handoff.pending(tmp_path)
    ours.release()
    with pytest.raises(nightly.NightlyStopped):
        assert streaming.acquire(blocking=False)
        nightly._wait_for_pending_handoff(tmp_path, StateLock(tmp_path), lambda: True)
