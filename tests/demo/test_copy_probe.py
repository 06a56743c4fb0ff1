"""The copy probe (k2ray/demo/copy_probe.py) on a few steps: both models train and report what it prints."""

from __future__ import annotations

import math

import pytest
import torch

from k2ray.demo.copy_probe import CopyTask, ProbeConfig, copy_batch, probe


@pytest.mark.parametrize("is_llama", [False, True], ids=["demo_mla", "llama"])
def test_a_few_steps_report_the_loss_and_copy_accuracy(is_llama: bool) -> None:
    rows = probe(ProbeConfig(num_distinct=8, steps=4, log_every=2, batch_size=4, is_llama=is_llama))
    assert [step for step, _, _ in rows] == [2, 4]
    assert all(math.isfinite(loss) and 0.0 <= accuracy <= 1.0 for _, loss, accuracy in rows)
    assert rows[0][1] > math.log(8) / 2  # untrained: far from copying yet


def test_shifted_rows_put_the_ids_at_varying_distances_from_their_repeat() -> None:
    task = CopyTask(num_distinct=16, seq_len=4, filler_len=10, first_id=300, num_base_tokens=400,
                    separator_id=401, is_shifted=True)
    batch = copy_batch(task, 64, torch.Generator().manual_seed(0))
    assert batch.shape == (64, task.repeat_start + task.seq_len)
    distances = set()
    for row in batch.tolist():
        repeat = row[task.repeat_start:]
        assert row[task.repeat_start - 1] == task.separator_id
        first = row.index(task.separator_id)  # the ids' own separator comes first (filler ids are below it)
        assert row[first + 1:first + 1 + task.seq_len] == repeat
        distances.add(task.repeat_start - (first + 1))
    assert len(distances) > 5  # a fixed look-back cannot copy them


def test_unshifted_layout_is_unchanged() -> None:
    task = CopyTask(num_distinct=16, seq_len=4, filler_len=10)
    batch = copy_batch(task, 8, torch.Generator().manual_seed(0))
    assert (batch[:, :task.seq_len] == batch[:, task.repeat_start:]).all()
    assert (batch[:, task.repeat_start - 1] == task.separator_id).all()
