"""vllm_compare's pure pieces: the workload, the statistics and ratios, the output comparison, the rotation of
the engines, the one tokenizer both engines load. No vLLM here: the comparison itself is `make bench-vllm`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import vllm_compare
import vllm_compare_model
from tokenizers import Tokenizer

from k2ray.api.tokenizer import K2Tokenizer
from k2ray.model.args import ModelArgs


def test_the_workload_is_the_same_for_a_seed_and_within_its_ranges():
    a, b = vllm_compare.make_workload(96, seed=0), vllm_compare.make_workload(96, seed=0)
    assert a == b
    assert a != vllm_compare.make_workload(96, seed=1)
    assert len(a["prompts"]) == len(a["output_lens"]) == 96
    lo, hi = vllm_compare.PROMPT_LEN_RANGE
    assert all(lo <= len(p) <= hi for p in a["prompts"])
    lo, hi = vllm_compare.OUTPUT_LEN_RANGE
    assert all(lo <= n <= hi for n in a["output_lens"])
    assert all(0 <= t < vllm_compare_model.NUM_BASE_TOKENS for p in a["prompts"] for t in p)
    assert len({len(p) for p in a["prompts"]}) > 10  # mixed lengths, not one shape


def test_spread_and_median_ratio():
    assert vllm_compare.spread([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "max": 3.0}
    assert vllm_compare.median_ratio([100.0, 300.0, 200.0], [50.0, 100.0, 400.0]) == pytest.approx(2.0)


def test_identical_share_counts_whole_sequences():
    assert vllm_compare.identical_share([[1, 2], [3], [4, 5]], [[1, 2], [3], [4, 6]]) == pytest.approx(2 / 3)
    assert vllm_compare.identical_share([[1, 2]], [[1, 2, 3]]) == 0.0
    with pytest.raises(ValueError):
        vllm_compare.identical_share([[1]], [[1], [2]])


def test_rounds_rotate_which_engine_runs_first():
    engines = ["k2ray", "vllm"]
    assert [vllm_compare.round_order(engines, r) for r in range(3)] == [
        ["k2ray", "vllm"], ["vllm", "k2ray"], ["k2ray", "vllm"]]


def _run(engine: str, threads: int, round_index: int, tok_s: float, token_ids: list[list[int]]) -> dict:
    # 10 s of generate, in wall and in CPU time alike: tokens per CPU second = tok/s
    return {"engine": engine, "threads": threads, "round": round_index, "output_tok_s": tok_s,
            "num_output_tokens": tok_s * 10, "generate_cpu_s": 10.0, "token_ids": token_ids}


def test_offline_summary_pairs_runs_of_the_same_round():
    same, other = [[1, 2], [3, 4]], [[1, 2], [3, 5]]
    runs = [_run("vllm", 1, 0, 100.0, same), _run("k2ray", 1, 0, 150.0, same), _run("vllm", 1, 1, 200.0, same),
            _run("k2ray", 1, 1, 90.0, other), _run("vllm", 2, 0, 300.0, same), _run("k2ray", 2, 0, 600.0, same)]
    report = vllm_compare.summarize_offline(runs, ["k2ray", "vllm"], [1, 2])
    one = report["1"]
    assert one["tok_s"]["k2ray"] == {"min": 90.0, "median": 120.0, "max": 150.0}
    assert one["ratio_vs_vllm"]["k2ray"] == pytest.approx(120.0 / 150.0)
    assert one["identical_output_share"]["k2ray"] == [1.0, 0.5]
    assert report["2"]["ratio_vs_vllm"]["k2ray"] == pytest.approx(2.0)
    # CPU time is only k2ray's: vLLM's engine core runs in a child process
    assert set(one["tok_per_cpu_s"]) == {"k2ray"} and one["tok_per_cpu_s"]["k2ray"]["median"] == pytest.approx(120.0)


def test_without_vllm_the_first_engine_is_the_baseline():
    runs = [_run("k2ray-eager", 1, 0, 100.0, [[1]]), _run("k2ray-compile", 1, 0, 80.0, [[1]])]
    report = vllm_compare.summarize_offline(runs, ["k2ray-eager", "k2ray-compile"], [1])
    assert report["1"]["ratio_vs_k2ray-eager"] == {"k2ray-compile": pytest.approx(0.8)}


def test_vllm_threads_are_bound_to_the_first_cores(tmp_path):
    assert vllm_compare.vllm_env(tmp_path, 1)["VLLM_CPU_OMP_THREADS_BIND"] == "0"
    assert vllm_compare.vllm_env(tmp_path, 2)["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"


def test_unknown_engines_are_refused():
    with pytest.raises(SystemExit):
        vllm_compare.parse_args(["--engines", "k2ray,sglang"])
    assert vllm_compare.parse_args(["--engines", "k2ray-eager,k2ray-compile"]).engines == [
        "k2ray-eager", "k2ray-compile"]


def test_the_checkpoint_config_is_the_issues_model():
    args = ModelArgs.from_hf_config(vllm_compare_model.COMPARE_CONFIG)
    assert (args.hidden_size, args.num_hidden_layers, args.num_attention_heads) == (256, 4, 8)
    assert (args.n_routed_experts, args.num_experts_per_tok, args.vocab_size) == (16, 4, 4096)
    assert args.kv_cache_dim == 576  # the only latent width vLLM's CPU MLA kernel takes


def test_both_engines_tokenizers_give_every_id_the_same_bytes(tmp_path: Path):
    vllm_compare_model.write_tokenizers(tmp_path)
    k2 = K2Tokenizer.from_pretrained(tmp_path)
    hf = Tokenizer.from_file(str(tmp_path / vllm_compare_model.HF_TOKENIZER_FILE))
    assert k2.vocab_size == hf.get_vocab_size() == vllm_compare_model.VOCAB_SIZE
    base = range(vllm_compare_model.NUM_BASE_TOKENS)
    assert all(hf.decode([i]).encode("utf-8", "surrogateescape") == k2.token_bytes(i)
               for i in base if k2.token_bytes(i).isascii())
    assert hf.decode(list(range(0, 4096, 7)), skip_special_tokens=False) == \
        b"".join(k2.token_bytes(i) for i in range(0, 4096, 7)).decode("utf-8", "replace")
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert hf.token_to_id("[EOS]") == k2.eos_token_id == vllm_compare_model.COMPARE_CONFIG["eos_token_id"]
