"""The README's sizing table for K2 on H200 nodes is what k8s/sizing/k2_h200.py computes from K2's config,
and the script's counts agree with K2's published figures."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from .chart import ROOT

SCRIPT = ROOT / "k8s" / "sizing" / "k2_h200.py"
_spec = importlib.util.spec_from_file_location("k2_h200", SCRIPT)
sizing = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("k2_h200", sizing)  # dataclasses look their module up there
_spec.loader.exec_module(sizing)


@pytest.fixture(scope="module")
def args():
    return sizing.load_args()


def test_parameter_counts_match_k2s_published_figures(args):
    counts = sizing.param_counts(args)
    assert counts.routed_experts == 60 * 384 * 3 * 7168 * 2048  # 1.0147e12
    assert counts.total == pytest.approx(1.026e12, rel=1e-3)  # "1T total" (llama.cpp: 1.027 T)
    assert counts.replicated == pytest.approx(11.7e9, rel=1e-2)
    # The INT4 checkpoint: 4 bits plus a BF16 scale per 32 weights for routed experts, BF16 for the rest.
    checkpoint = counts.routed_experts * sizing.routed_bytes_per_param(args) + counts.replicated * 2
    assert checkpoint == pytest.approx(594e9, rel=1e-2)


def test_kv_capacity_follows_from_the_latent_cache_and_the_memory_left(args):
    rank = sizing.size_rank(args, 8)
    assert rank.kv_tokens * 70_272 <= rank.kv_budget_bytes < (rank.kv_tokens + 1) * 70_272
    assert rank.weight_bytes + rank.kv_budget_bytes + sizing.ACTIVATION_RESERVE_BYTES == \
        int(sizing.H200_HBM_BYTES * sizing.DEFAULT_GPU_MEMORY_UTILIZATION)
    assert rank.group_kv_tokens == 8 * rank.kv_tokens and rank.num_nodes == 1
    wider = sizing.size_rank(args, 16)
    assert wider.kv_tokens > rank.kv_tokens and wider.num_nodes == 2  # fewer experts per GPU: more room


def test_a_group_too_small_for_the_weights_is_refused(args):
    with pytest.raises(ValueError, match="no KV cache"):
        sizing.size_rank(args, 4)


def test_the_readmes_table_is_the_scripts():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check", str(ROOT / "README.md")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
