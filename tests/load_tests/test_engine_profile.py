"""engine_profile's accounting on a tiny run: every part non-negative, the parts adding up to the steps,
attention and MoE seen in every load."""

from __future__ import annotations

import math
from pathlib import Path

import engine_profile
import pytest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("profile")
    engine_profile.make_checkpoint(path, 0, engine_profile.PROFILE_CONFIG)
    return path


@pytest.mark.parametrize("load", list(engine_profile.LOADS))
def test_the_parts_add_up_to_the_steps(checkpoint, load, monkeypatch):
    monkeypatch.setitem(engine_profile.LOADS, "prefill", ((40, 60), (2, 3)))
    monkeypatch.setitem(engine_profile.LOADS, "decode", ((4, 8), (6, 10)))
    args = engine_profile.parse_args(["--num-requests", "3", "--device", "cpu"])
    report = engine_profile.profile(checkpoint, load, args)
    parts = report["parts_s"]
    assert set(parts) == set(engine_profile.PARTS)
    assert all(seconds >= 0 for seconds in parts.values()), parts
    assert math.isclose(sum(parts.values()), report["step_s"], rel_tol=1e-9)
    assert parts["attention"] > 0 and parts["moe"] > 0
    assert report["num_steps"] >= 2 and report["num_output_tokens"] > 0
