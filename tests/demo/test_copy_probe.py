"""The copy probe (k2ray/demo/copy_probe.py): a model of the demo's sizes learns an induction copy."""

from __future__ import annotations

from k2ray.demo.copy_probe import ProbeConfig, probe


def test_the_demo_sizes_learn_to_copy_a_few_distinct_ids() -> None:
    # Eight distinct ids: the circuit forms within a hundred steps (a copy of 512 distinct ids does not form
    # in 400 at the demo's kv_lora_rank; see the README's demo section).
    rows = probe(ProbeConfig(num_distinct=8, steps=100, log_every=50))
    assert [step for step, _, _ in rows] == [50, 100]
    step, loss, accuracy = rows[-1]
    assert accuracy >= 0.9 and loss < rows[0][1]
