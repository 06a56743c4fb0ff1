"""The checkpoint vllm_compare.py runs through both engines: a tiny random DeepSeek-V3, fp32, deterministic.

Hidden 256, 4 layers, 8 heads, 16 routed experts top-4, kv_lora_rank 512 + rope 64 (vLLM's CPU MLA kernel takes
only K2's 576-wide latent), vocab 4096. config.json spells out `topk_method: noaux_tc`, `scoring_func: sigmoid`
and `moe_layer_freq: 1` (vLLM creates the router's correction bias only then). One tokenizer both engines
load: `tiktoken.model` + `tokenizer_config.json` for k2ray's K2Tokenizer and `tokenizer.json` (the same ids,
the same bytes) for vLLM's PreTrainedTokenizerFast; 3,840 base tokens (256 bytes + 3,584 byte pairs) and K2's
256 special slots after them.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import string
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2ray.api.tokenizer import CONFIG_FILE, VOCAB_FILE
from k2ray.api.tokenizer_assets import tokenizer_config
from k2ray.model.args import ModelArgs
from k2ray.model.tiny_checkpoint import random_state

VOCAB_SIZE = 4096
NUM_SPECIAL_TOKENS = 256
NUM_BASE_TOKENS = VOCAB_SIZE - NUM_SPECIAL_TOKENS
NUM_BYTES = 256
# Pairs drawn from this alphabet, in this order, become the merged tokens (deterministic, no training).
PAIR_ALPHABET = " etaoinshrdlucmfwypvbgkjqxz" + string.ascii_uppercase + string.digits + string.punctuation
HF_TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILE = "model.safetensors"
STAMP_FILE = "vllm_compare.sha256"

COMPARE_CONFIG: dict = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "n_shared_experts": 1,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "q_lora_rank": 96,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 64,
    "v_head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 0,
    "bos_token_id": NUM_BASE_TOKENS,  # [BOS], the first special slot
    "eos_token_id": NUM_BASE_TOKENS + 1,  # [EOS]
    "torch_dtype": "float32",
    "use_cache": True,
}


def base_tokens() -> list[bytes]:
    """Rank order: the 256 single bytes, then byte pairs (a merge of two single bytes each)."""
    pairs = (a.encode() + b.encode() for a, b in itertools.product(PAIR_ALPHABET, repeat=2))
    tokens = [bytes([i]) for i in range(NUM_BYTES)] + list(itertools.islice(pairs, NUM_BASE_TOKENS - NUM_BYTES))
    if len(tokens) != NUM_BASE_TOKENS:
        raise ValueError(f"the pair alphabet gives {len(tokens)} base tokens, want {NUM_BASE_TOKENS}")
    return tokens


def _byte_to_unicode() -> dict[int, str]:
    # GPT-2's byte-level alphabet (what tokenizers' ByteLevel pre-tokenizer and decoder use).
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = list(printable), 0
    for b in range(NUM_BYTES):
        if b not in printable:
            printable.append(b)
            chars.append(NUM_BYTES + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def hf_tokenizer_json(tokens: list[bytes], specials: list[str]) -> dict:
    """tokenizer.json of a byte-level BPE with `tokens` as its vocabulary (id = rank) and `specials` after."""
    to_char = _byte_to_unicode()

    def piece(token: bytes) -> str:
        return "".join(to_char[b] for b in token)

    vocab = {piece(token): rank for rank, token in enumerate(tokens)}
    merges = [[piece(token[:1]), piece(token[1:])] for token in tokens[NUM_BYTES:]]
    added = [{"id": NUM_BASE_TOKENS + i, "content": content, "single_word": False, "lstrip": False,
              "rstrip": False, "normalized": False, "special": True} for i, content in enumerate(specials)]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def write_tokenizers(out_dir: Path) -> None:
    tokens = base_tokens()
    lines = [f"{base64.b64encode(token).decode('ascii')} {rank}" for rank, token in enumerate(tokens)]
    (out_dir / VOCAB_FILE).write_text("\n".join(lines) + "\n", encoding="ascii")
    config = tokenizer_config(NUM_BASE_TOKENS)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # vLLM's loader; K2Tokenizer ignores the class
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    specials = [config["added_tokens_decoder"][str(NUM_BASE_TOKENS + i)]["content"] for i in range(NUM_SPECIAL_TOKENS)]
    (out_dir / HF_TOKENIZER_FILE).write_text(json.dumps(hf_tokenizer_json(tokens, specials)), encoding="utf-8")


def write_compare_checkpoint(out_dir: str | Path, seed: int = 0) -> Path:
    """Writes the checkpoint (once: a stamp of config + seed makes a rerun a no-op) and returns its directory."""
    out_dir = Path(out_dir)
    config = dict(COMPARE_CONFIG)
    stamp = hashlib.sha256(json.dumps([config, seed], sort_keys=True).encode()).hexdigest()
    if (out_dir / STAMP_FILE).exists() and (out_dir / STAMP_FILE).read_text() == stamp:
        return out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    state = random_state(ModelArgs.from_hf_config(config), seed, torch.float32)
    save_file({name: t.contiguous() for name, t in state.items()}, str(out_dir / WEIGHTS_FILE),
              metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}) + "\n")
    write_tokenizers(out_dir)
    (out_dir / STAMP_FILE).write_text(stamp)
    return out_dir
