"""`engine.ep_size` from the YAMLs into the deployments: one placement-group bundle per rank, packed on one node."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from k2ray.serve.app import _ep_placement
from k2ray.serve.args import EngineArgs, load_serve_args
from k2ray.serve.engine.core_replica import core_config
from k2ray.serve.engine.ep_core_group import prefill_source_id, rank_configs

REPO = Path(__file__).resolve().parents[3]


def test_ep_yamls_load():
    colocated = load_serve_args(REPO / "deploy/serve/ep.yaml")
    assert not colocated.disaggregated and colocated.engine.ep_size == 2
    pd = load_serve_args(REPO / "deploy/serve/pd-ep.yaml")
    assert pd.disaggregated
    assert pd.pool_engine("prefill").ep_size == pd.pool_engine("decode").ep_size == 2


def test_one_bundle_per_rank_the_first_holding_every_gpu():
    assert _ep_placement(EngineArgs()) == {}
    cpu = _ep_placement(EngineArgs(ep_size=4, num_cpus=0.25))
    assert cpu == {"placement_group_bundles": [{"CPU": 0.25}] * 4, "placement_group_strategy": "STRICT_PACK"}
    gpu = _ep_placement(EngineArgs(ep_size=2, num_cpus=1, num_gpus=1))
    assert gpu["placement_group_bundles"] == [{"CPU": 1, "GPU": 2}, {"CPU": 1}]  # 2 GPUs, not 3


def test_rank_configs_name_each_rank_of_one_group():
    args = load_serve_args({"engine": {"ep_size": 4}})
    configs = rank_configs(core_config(args), 12345)
    assert [c.ep.rank for c in configs] == [0, 1, 2, 3]
    assert len({c.ep.group_id for c in configs}) == 1 and {c.ep.port for c in configs} == {12345}
    assert all(c.engine.ep_size == 4 for c in configs)


def test_the_decode_side_names_the_sending_core_whatever_the_prefill_ep_size():
    assert prefill_source_id("p1", "req-7", 1) == "p1"  # a prefill replica without EP: one core, its own id
    ids = {prefill_source_id("p1", f"req-{i}", 2) for i in range(32)}
    assert ids == {"p1-rank0", "p1-rank1"}  # an EP prefill replica: its ranks' cores, as rank_configs names them


def test_ep_size_is_validated():
    with pytest.raises(ValidationError, match="ep_size"):
        load_serve_args({"engine": {"ep_size": 0}})
