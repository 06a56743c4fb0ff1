"""`engine.ep_size` from the YAMLs into the deployments: one placement-group bundle per rank, packed on one node."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from k2ray.dist.kv_connector import KVTransferConfig
from k2ray.serve.app import _ep_placement
from k2ray.serve.args import EngineArgs, load_serve_args
from k2ray.serve.engine.core_replica import core_config
from k2ray.serve.engine.engine_core_protocol import CorePDConfig
from k2ray.serve.engine.ep_bundles import BundleGrant
from k2ray.serve.engine.ep_core_group import EP_CORE_COMMAND, least_loaded_rank, rank_configs

REPO = Path(__file__).resolve().parents[3]


def test_ep_yamls_load():
    colocated = load_serve_args(REPO / "deploy/serve/ep.yaml")
    assert not colocated.disaggregated and colocated.engine.ep_size == 2
    pd = load_serve_args(REPO / "deploy/serve/pd-ep.yaml")
    assert pd.disaggregated
    assert pd.pool_engine("prefill").ep_size == pd.pool_engine("decode").ep_size == 2


def test_one_bundle_per_rank_each_with_its_gpu():
    assert _ep_placement(EngineArgs()) == {}
    cpu = _ep_placement(EngineArgs(ep_size=4, num_cpus=0.25))
    assert cpu == {"placement_group_bundles": [{"CPU": 0.25}] * 4, "placement_group_strategy": "STRICT_PACK"}
    gpu = _ep_placement(EngineArgs(ep_size=2, num_cpus=1, num_gpus=1, resources={"k2ray_decode": 1}))
    # 2 GPUs in all, one per rank's bundle; the pool's custom resource once, with the replica actor (bundle 0)
    assert gpu["placement_group_bundles"] == [{"CPU": 1, "GPU": 1, "k2ray_decode": 1}, {"CPU": 1, "GPU": 1}]


def test_a_rank_core_sees_only_its_bundles_gpu():
    on_cpu = BundleGrant(rank=1, bundle_index=1, placement_group_id="pg", node_id="n", gpu_ids=())
    assert on_cpu.core_command(EP_CORE_COMMAND) == EP_CORE_COMMAND
    on_gpu = BundleGrant(rank=1, bundle_index=1, placement_group_id="pg", node_id="n", gpu_ids=("5",))
    assert on_gpu.core_command(EP_CORE_COMMAND) == ("env", "CUDA_VISIBLE_DEVICES=5", *EP_CORE_COMMAND)


def test_rank_configs_name_each_rank_of_one_group():
    args = load_serve_args({"engine": {"ep_size": 4}})
    configs = rank_configs(core_config(args), 12345)
    assert [c.ep.rank for c in configs] == [0, 1, 2, 3]
    assert len({c.ep.group_id for c in configs}) == 1 and {c.ep.port for c in configs} == {12345}
    assert all(c.engine.ep_size == 4 for c in configs)


def test_rank_configs_give_each_rank_its_own_pd_core_id():
    """A prefill rank's core id is what the decode rank pairs with (PrefillReply.source_id): one per rank."""
    args = load_serve_args({"engine": {"ep_size": 2}, "disaggregated": True})
    pd = CorePDConfig(KVTransferConfig(), host="", core_id="p1")
    assert [c.pd.core_id for c in rank_configs(core_config(args, role="prefill", pd=pd), 12345)] == [
        "p1-rank0", "p1-rank1"]


def test_a_new_request_goes_to_the_least_loaded_rank():
    assert least_loaded_rank([2, 1, 1], [10, 3, 7]) == 2  # fewest in flight, then most free blocks
    assert least_loaded_rank([0, 0], [5, 5]) == 0  # a tie: the lowest rank
    assert least_loaded_rank([1, 3], [0, 100]) == 0  # requests in flight first


def test_ep_size_is_validated():
    with pytest.raises(ValidationError, match="ep_size"):
        load_serve_args({"engine": {"ep_size": 0}})
