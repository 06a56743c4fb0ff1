"""The copy probe (k2ray/demo/copy_probe.py) on a few steps: both models train and report what it prints."""

from __future__ import annotations

import math

import pytest

from k2ray.demo.copy_probe import ProbeConfig, probe


@pytest.mark.parametrize("is_llama", [False, True], ids=["demo_mla", "llama"])
def test_a_few_steps_report_the_loss_and_copy_accuracy(is_llama: bool) -> None:
    rows = probe(ProbeConfig(num_distinct=8, steps=4, log_every=2, batch_size=4, is_llama=is_llama))
    assert [step for step, _, _ in rows] == [2, 4]
    assert all(math.isfinite(loss) and 0.0 <= accuracy <= 1.0 for _, loss, accuracy in rows)
    assert rows[0][1] > math.log(8) / 2  # untrained: far from copying yet
