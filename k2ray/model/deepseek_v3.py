"""Kimi K2 / DeepSeek-V3 network: MLA over a paged latent cache + noaux_tc sigmoid MoE, all in this file.

Shape legend
    T = tokens in this step (decode tokens first, then prefill chunks), B = sequences
    D = hidden_size, V = vocab_size, H = num_attention_heads
    Q = q_lora_rank, L = kv_lora_rank, N = qk_nope_head_dim, R = qk_rope_head_dim, Dv = v_head_dim
    S = context length of one prefill sequence (cached + this chunk)
    E = n_routed_experts, P = physical experts (E + redundant), El = experts held by this worker, A = num_experts_per_tok, I = moe_intermediate_size
    G = n_group, NB = num_blocks, BS = block_size

MLA runs in two forms (AttentionMetadata contract):
    decode  (1 query token / sequence): absorbed. q_latent = q_nope . W_UK, attend against c_kv rows of the
            paged cache, then out = attn_latent . W_UV. Never materialises per-head K/V.
    prefill (chunks): plain. The chunk attends to its own tokens causally, then to the cached context in
            chunks of at most prefill_context_chunk latent rows, each expanded with W_UKV = wkv_b, the partial
            results merged by log-sum-exp (prefill_attention.py): workspace bounded whatever S is. All chunks
            of a step go through one varlen call located by cumulative query offsets (varlen_prefill.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .args import ModelArgs
from .attention_metadata import AttentionMetadata
from .expert_map import ExpertMap, replica_tables
from .prefill_attention import MLAPrefillWeights
from .rope import apply_rotary, rope_cos_sin, rope_inv_freq, softmax_scale, yarn_attention_factor
from .varlen_prefill import varlen_prefill_attention

KernelBackend = Literal["torch", "triton"]
# DeepSeek's q_a/kv_a latent norms are built with the RMSNorm default eps, not config.rms_norm_eps
# (modeling_deepseek.py and transformers both do this).
LATENT_NORM_EPS = 1e-6
# Guards the routing-weight renormalisation against an all-zero top-k (transformers uses the same value).
ROUTER_NORM_EPS = 1e-20
# Group score = sum of the best experts in a group (DeepSeek-V3 noaux_tc).
TOP_EXPERTS_PER_GROUP_SCORE = 2
INT32_BITS = 32
# Rows of the padded expert slabs one dense MoE chunk may allocate on a device ([El + 1, tokens, D] each).
PADDED_MOE_MAX_ROWS = 1 << 16

# A worker's routed experts: (x [t, D], weights [t, A], global ids [t, A]) -> [t, D], the weighted sum over the
# experts it holds (foreign ids contribute nothing).
LocalExperts = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertDispatch(Protocol):
    """Expert parallelism: the workers of a group each hold a contiguous slice of every MoE layer's routed experts.

    Every MoE layer of every worker calls it once per forward, in the same order, with that worker's own tokens
    (T may be 0: a worker without tokens still takes part). x [T, D]; weights float32 [T, A], already scaled by
    routed_scaling_factor; ids int64 [T, A], global expert ids. Returns the routed output over all experts [T, D];
    `local_experts` runs this worker's slice on whatever rows the other workers send it.
    """

    def __call__(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, local_experts: LocalExperts
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class Kernels:
    """The attention / MoE kernels a model instance uses, chosen once at construction."""

    store_latent_kv: Callable[..., None]
    mla_decode_attention: Callable[..., torch.Tensor]
    fused_moe_int4: Callable[..., torch.Tensor]
    merge_attention_states: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def for_backend(cls, backend: KernelBackend) -> Kernels:
        if backend == "torch":
            from k2ray.kernels import (
                fused_moe_int4_ref,
                merge_attention_states_ref,
                mla_decode_attention_cpu,
                store_latent_kv_ref,
            )
            from k2ray.kernels.mla_decode_cpu import native_library as cpu_decode_library

            # Decode reads the paged cache in place on CPU (a C kernel; elsewhere, or with no C compiler, in
            # length-sorted groups); mla_decode_attention_ref stays the tests' reference. Built now, once per
            # process, so no step waits for the compiler.
            cpu_decode_library()
            return cls(store_latent_kv_ref, mla_decode_attention_cpu, fused_moe_int4_ref,
                       merge_attention_states_ref)
        if backend == "triton":
            from k2ray.kernels import (
                fused_moe_int4,
                merge_attention_states,
                mla_decode_attention,
                store_latent_kv,
            )

            return cls(store_latent_kv, mla_decode_attention, fused_moe_int4, merge_attention_states)
        raise ValueError(f"unknown kernel_backend {backend!r}: expected 'torch' or 'triton'")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32, scale in the input dtype (same rounding points as the reference).
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _linear(in_features: int, out_features: int, dtype: torch.dtype) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False, dtype=dtype)


class MLP(nn.Module):
    """SwiGLU: dense layers, shared experts. w1 = gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, dim: int, inter_dim: int, dtype: torch.dtype):
        super().__init__()
        self.w1 = _linear(dim, inter_dim, dtype)
        self.w3 = _linear(dim, inter_dim, dtype)
        self.w2 = _linear(inter_dim, dim, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, kernels: Kernels, dtype: torch.dtype):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.rope_interleave = args.rope_interleave
        self.softmax_scale = softmax_scale(args)
        self.kernels = kernels
        qk_out = self.n_heads * args.qk_head_dim
        if self.q_lora_rank is None:
            self.wq = _linear(args.hidden_size, qk_out, dtype)
        else:
            self.wq_a = _linear(args.hidden_size, self.q_lora_rank, dtype)
            self.q_norm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS, dtype)
            self.wq_b = _linear(self.q_lora_rank, qk_out, dtype)
        self.wkv_a = _linear(args.hidden_size, args.kv_cache_dim, dtype)
        self.kv_norm = RMSNorm(self.kv_lora_rank, LATENT_NORM_EPS, dtype)
        self.wkv_b = _linear(self.kv_lora_rank, self.n_heads * (self.qk_nope_head_dim + self.v_head_dim), dtype)
        self.wo = _linear(self.n_heads * self.v_head_dim, args.hidden_size, dtype)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.wq(x) if self.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        # Explicit sizes: an EP rank without tokens runs with T = 0, where -1 is ambiguous.
        q = q.view(num_tokens, self.n_heads, self.qk_nope_head_dim + self.qk_rope_head_dim)  # [T, H, N + R]
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # [T, L], [T, R]
        c_kv = self.kv_norm(c_kv)
        q_pe = apply_rotary(q_pe, cos, sin, self.rope_interleave)  # [T, H, R]
        k_pe = apply_rotary(k_pe, cos, sin, self.rope_interleave)  # [T, R]
        # New rows go into the cache first, so every form below reads its own tokens from there.
        self.kernels.store_latent_kv(c_kv, k_pe, kv_cache, meta.slot_mapping)

        out = x.new_empty(num_tokens, self.n_heads, self.v_head_dim)  # [T, H, Dv]
        num_decodes = meta.num_decodes
        if num_decodes:
            out[:num_decodes] = self._decode(q_nope[:num_decodes], q_pe[:num_decodes], kv_cache, meta)
        if num_decodes < num_tokens:
            out[num_decodes:] = self._prefill(
                q_nope[num_decodes:], q_pe[num_decodes:], c_kv[num_decodes:], k_pe[num_decodes:], kv_cache, meta
            )
        return self.wo(out.flatten(1))

    def _wkv_b_heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK [H, N, L], W_UV [H, Dv, L] as views of wkv_b."""
        w = self.wkv_b.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim :]

    def _decode(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        w_uk, w_uv = self._wkv_b_heads()
        q_latent = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)  # [B, H, L]
        nd = meta.num_decodes
        attn = self.kernels.mla_decode_attention(
            q_latent.to(kv_cache.dtype), q_pe.to(kv_cache.dtype), kv_cache, meta.block_tables[:nd],
            meta.seq_lens[:nd], self.softmax_scale, max_seq_len=max(meta.seq_lens_cpu[:nd]),
        )  # [B, H, L]
        return torch.einsum("bhc,hvc->bhv", attn.to(w_uv.dtype), w_uv)  # [B, H, Dv]

    @property
    def prefill_weights(self) -> MLAPrefillWeights:
        w_uk, w_uv = self._wkv_b_heads()
        return MLAPrefillWeights(self.wkv_b, w_uk, w_uv, self.n_heads, self.kv_lora_rank, self.qk_nope_head_dim,
                                 self.v_head_dim, self.softmax_scale)

    def _prefill(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor,
        kv_cache: torch.Tensor, meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The prefill sequences' rows (after the decodes) -> [Tp, H, Dv]: one varlen call over all of the step's
        chunks (varlen_prefill.py)."""
        if c_kv.dtype != kv_cache.dtype:  # see the new tokens as the cache holds them, as later steps will
            c_kv, k_pe = (t.to(kv_cache.dtype).to(q_nope.dtype) for t in (c_kv, k_pe))
        weights = self.prefill_weights
        new_k, new_v = weights.expand(c_kv, k_pe)  # [H, Tp, N + R], [H, Tp, Dv]: one matmul for all sequences
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(0, 1)  # [H, Tp, N + R]
        return varlen_prefill_attention(weights, q, new_k, new_v, kv_cache, meta,
                                        self.kernels.merge_attention_states)


class Gate(nn.Module):
    """noaux_tc router: sigmoid scores; the bias steers selection only; weights from unbiased scores."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.n_group = args.n_group
        self.topk_group = args.topk_group
        self.norm_topk_prob = args.norm_topk_prob
        self.route_scale = args.routed_scaling_factor
        # Routing runs in fp32 like the reference, whatever the model dtype.
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights float32 [T, A], expert ids int64 [T, A])."""
        scores = F.linear(x.to(torch.float32), self.weight).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, choice.shape[-1] // self.n_group)  # [T, G, E / G]
            group_scores = grouped.topk(TOP_EXPERTS_PER_GROUP_SCORE, dim=-1)[0].sum(dim=-1)  # [T, G]
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
        ids = choice.topk(self.top_k, dim=-1, sorted=False)[1]  # [T, A]
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + ROUTER_NORM_EPS)
        return weights * self.route_scale, ids


class RoutedExperts(nn.Module):
    """Experts [expert_start, expert_start + El) of one MoE layer, stacked per expert.

    Dense:  w13 [El, 2I, D] (gate_proj rows, then up_proj rows), w2 [El, D, I]
    Packed: w13_packed [El, 2I, D / 8] int32 + w13_scale [El, 2I, D / group], w2_packed / w2_scale likewise
            (compressed-tensors pack-quantized layout, consumed by fused_moe_int4).
    """

    def __init__(
        self, args: ModelArgs, expert_start: int, num_local_experts: int, packed: bool, dtype: torch.dtype,
        kernels: Kernels, num_physical_experts: int | None = None,
    ):
        super().__init__()
        self.expert_start = expert_start
        self.num_local_experts = num_local_experts
        # Ids reaching forward are physical ones (= logical without redundant experts).
        self.num_physical_experts = num_physical_experts or args.n_routed_experts
        self.packed = packed
        self.kernels = kernels
        dim, inter, n = args.hidden_size, args.moe_intermediate_size, num_local_experts
        if not packed:
            self.w13 = nn.Parameter(torch.empty(n, 2 * inter, dim, dtype=dtype))
            self.w2 = nn.Parameter(torch.empty(n, dim, inter, dtype=dtype))
            return
        quant = args.quantization
        assert quant is not None, "packed experts need a quantization_config"
        self.group_size = quant.group_size
        words = INT32_BITS // quant.num_bits  # values per packed word
        self.register_buffer("w13_packed", torch.empty(n, 2 * inter, dim // words, dtype=torch.int32))
        self.register_buffer("w13_scale", torch.empty(n, 2 * inter, dim // self.group_size, dtype=torch.bfloat16))
        self.register_buffer("w2_packed", torch.empty(n, dim, inter // words, dtype=torch.int32))
        self.register_buffer("w2_scale", torch.empty(n, dim, inter // self.group_size, dtype=torch.bfloat16))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, D], weights [T, A], ids [T, A] (global physical expert ids) -> this worker's share of the output
        [T, D]."""
        if self.packed:
            return self._forward_packed(x, weights, ids)
        if x.device.type == "cpu":
            return self._forward_sorted(x, weights, ids)
        return self._forward_padded(x, weights, ids)

    def _forward_sorted(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Pairs sorted by expert (stable, so each token sums its experts in ascending order as a loop over
        experts would), one matmul per projection per local expert over its contiguous run, the activation
        over all runs at once. On the host the group sizes cost no device sync; the device path is
        _forward_padded."""
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_physical_experts).tolist()
        first = sum(counts[:self.expert_start])
        runs, start = [], first
        for local, num_pairs in enumerate(counts[self.expert_start:self.expert_start + self.num_local_experts]):
            if num_pairs:
                runs.append((local, slice(start - first, start - first + num_pairs)))
            start += num_pairs
        pairs = order[first:start]  # this worker's (token, slot) pairs, flattened, by expert
        token_idx = pairs // ids.shape[1]
        rows = x[token_idx]
        gate_up = rows.new_empty(rows.shape[0], self.w13.shape[1])
        for local, run in runs:
            torch.mm(rows[run], self.w13[local].t(), out=gate_up[run])
        inter = gate_up.shape[-1] // 2
        hidden = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = torch.empty_like(rows)
        for local, run in runs:
            torch.mm(hidden[run], self.w2[local].t(), out=y[run])
        # In place: out of place, a [n, D] * [n, 1] broadcast takes a slow TensorIterator loop on CPU (~10x).
        y.mul_(weights.flatten()[pairs, None])
        return torch.zeros_like(x).index_add_(0, token_idx, y)

    def _forward_padded(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """No host sync: each local expert gets a [T, D] slab (top-k experts are distinct, so no expert sees
        a token twice), filled by each pair's rank within its expert, and one bmm per projection runs them
        all. Foreign pairs land in a spare slab that no matmul reads and whose output is zero. Tokens go in chunks that bound the slabs."""
        out = torch.empty_like(x)
        chunk = max(1, PADDED_MOE_MAX_ROWS // (self.num_local_experts + 1))
        for t0 in range(0, x.shape[0], chunk):
            rows = slice(t0, t0 + chunk)
            out[rows] = self._padded_chunk(x[rows], weights[rows], ids[rows])
        return out

    def _padded_chunk(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = ids.shape
        num_local = self.num_local_experts
        local_ids = ids.flatten() - self.expert_start
        is_local = (local_ids >= 0) & (local_ids < num_local)
        group = torch.where(is_local, local_ids, torch.full_like(local_ids, num_local))  # [T * A]
        order = torch.argsort(group, stable=True)
        num_per_group = torch.zeros(num_local + 1, dtype=torch.int64, device=x.device)
        num_per_group.scatter_add_(0, group, torch.ones_like(group))
        group_start = num_per_group.cumsum(0) - num_per_group
        rank = torch.empty_like(group)
        rank[order] = torch.arange(group.numel(), device=x.device) - group_start[group[order]]
        rank = torch.where(is_local, rank, torch.zeros_like(rank))  # foreign pairs share the spare slab's row 0
        slabs = x.new_zeros(num_local + 1, num_tokens, x.shape[1])
        slabs[group, rank] = x.repeat_interleave(top_k, dim=0)
        gate_up = torch.bmm(slabs[:num_local], self.w13.transpose(1, 2))  # [El, T, 2I]
        inter = gate_up.shape[-1] // 2
        expert_out = torch.empty_like(slabs)
        expert_out[num_local].zero_()
        torch.bmm(F.silu(gate_up[..., :inter]) * gate_up[..., inter:], self.w2.transpose(1, 2),
                  out=expert_out[:num_local])
        y = expert_out[group, rank] * torch.where(is_local, weights.flatten(), 0.0)[:, None]
        return y.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)

    def _forward_packed(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        local_ids = ids - self.expert_start
        is_local = (local_ids >= 0) & (local_ids < self.num_local_experts)
        # Foreign experts get weight 0 on a valid local slot, so the kernel sees only local ids.
        local_ids = torch.where(is_local, local_ids, torch.zeros_like(local_ids))
        weights = torch.where(is_local, weights, torch.zeros_like(weights))
        return self.kernels.fused_moe_int4(
            x, local_ids, weights, self.w13_packed, self.w13_scale, self.w2_packed, self.w2_scale, 1.0,
            self.group_size,
        )


@dataclass(frozen=True)
class ExpertPlacement:
    """Which routed experts a worker holds for one MoE layer, and how tokens reach the other workers' experts.

    Expert ids here are physical: with `physical_to_logical` (redundant experts, expert_map.py) physical
    expert p runs logical expert physical_to_logical[p], and a replicated expert's tokens are split over its
    replicas by (token index + replica_offset); without it physical = logical."""

    expert_start: int
    num_local_experts: int
    packed: bool
    expert_dispatch: ExpertDispatch | None
    physical_to_logical: tuple[int, ...] | None = None
    replica_offset: int = 0


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, placement: ExpertPlacement, dtype: torch.dtype, kernels: Kernels):
        super().__init__()
        self.gate = Gate(args)
        self.n_routed_experts = args.n_routed_experts
        self.physical_to_logical = placement.physical_to_logical
        self.replica_offset = placement.replica_offset
        num_physical = len(self.physical_to_logical) if self.physical_to_logical else args.n_routed_experts
        self.experts = RoutedExperts(
            args, placement.expert_start, placement.num_local_experts, placement.packed, dtype, kernels, num_physical
        )
        self.expert_dispatch = placement.expert_dispatch
        # Tokens routed to each physical expert (all P, from this worker's tokens) since the last take: the load
        # statistic. Counted on the device by scatter_add (bincount would sync with the host on CUDA).
        self.register_buffer("expert_token_counts", torch.zeros(num_physical, dtype=torch.int64), persistent=False)
        if self.physical_to_logical is not None:
            table, num_replicas = replica_tables(self.physical_to_logical, args.n_routed_experts)
            self.register_buffer("replica_table", table, persistent=False)  # [E, max replicas]
            self.register_buffer("num_replicas", num_replicas, persistent=False)  # [E]
            self.register_buffer("logical_of_physical", torch.tensor(self.physical_to_logical), persistent=False)
        self.shared_experts = (
            MLP(args.hidden_size, args.moe_intermediate_size * args.n_shared_experts, dtype)
            if args.n_shared_experts
            else None
        )

    @property
    def local_logical_ids(self) -> tuple[int, ...]:
        """The logical expert each local slot holds (what the loader fills it with)."""
        local = range(self.experts.expert_start, self.experts.expert_start + self.experts.num_local_experts)
        return tuple(local) if self.physical_to_logical is None else tuple(self.physical_to_logical[p] for p in local)

    def init_routing_tables(self) -> None:
        """Refill the replica tables after materialising from the meta device (`to_empty` leaves them garbage)."""
        if self.physical_to_logical is None:
            return
        table, num_replicas = replica_tables(self.physical_to_logical, self.n_routed_experts)
        self.replica_table.copy_(table)
        self.num_replicas.copy_(num_replicas)
        self.logical_of_physical.copy_(torch.tensor(self.physical_to_logical))

    def token_counts(self, restart: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens per logical expert [E], per physical expert [P]) since the last restart, on the device."""
        physical = self.expert_token_counts.clone()
        if restart:
            self.expert_token_counts.zero_()
        if self.physical_to_logical is None:
            return physical, physical
        logical = torch.zeros(self.n_routed_experts, dtype=torch.int64, device=physical.device)
        return logical.index_add_(0, self.logical_of_physical, physical), physical

    def _physical_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Logical ids [T, A] -> physical ids. The k-th token (in token order) routed to expert e takes replica
        (k + replica_offset) mod e's replica count: deterministic, even to one token per step, and offset per
        rank so single-token decode steps spread too. Replicas hold the same weights: the output is unchanged."""
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        num_per_expert = torch.zeros_like(self.num_replicas).scatter_add_(0, flat, torch.ones_like(flat))
        first_of_expert = num_per_expert.cumsum(0) - num_per_expert  # where each expert's run starts in `order`
        index_in_expert = torch.empty_like(flat)
        index_in_expert[order] = torch.arange(flat.numel(), device=flat.device) - first_of_expert[flat[order]]
        replica = (index_in_expert + self.replica_offset) % self.num_replicas[flat]
        return self.replica_table[flat, replica].view_as(ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)  # [T, A]
        if self.physical_to_logical is not None:
            ids = self._physical_ids(ids)
        flat_ids = ids.flatten()
        self.expert_token_counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
        if self.expert_dispatch is None:
            y = self.experts(x, weights, ids)
        else:
            y = self.expert_dispatch(x, weights, ids, self.experts)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y


class Block(nn.Module):
    def __init__(self, args: ModelArgs, kernels: Kernels, dtype: torch.dtype, placement: ExpertPlacement | None):
        super().__init__()
        self.attn = MLA(args, kernels, dtype)
        self.ffn = (
            MoE(args, placement, dtype, kernels)
            if placement is not None
            else MLP(args.hidden_size, args.intermediate_size, dtype)
        )
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, kv_cache, meta)
        return x + self.ffn(self.ffn_norm(x))


def routed_experts_are_packed(args: ModelArgs, layer_id: int) -> bool:
    """Whether the checkpoint stores this layer's routed experts pack-quantized (K2: yes, per its ignore list)."""
    quant = args.quantization
    return quant is not None and quant.is_quantized(f"model.layers.{layer_id}.mlp.experts.0.gate_proj")


@dataclass(frozen=True)
class ExpertLoad:
    """Tokens (token x top-k slots) routed per MoE layer: per logical expert int64 [layers, E] and per physical
    expert int64 [layers, P] (the same without redundant experts); physical ids are rank-major."""

    logical: torch.Tensor
    physical: torch.Tensor


@dataclass(frozen=True)
class ParameterBytes:
    routed_experts: int
    replicated: int  # everything else: attention, shared experts, dense layers, embeddings, the head

    @property
    def total(self) -> int:
        return self.routed_experts + self.replicated


class Transformer(nn.Module):
    """forward(input_ids [T], positions [T], kv_caches, attn_metadata) -> final-normed hidden [T, D];
    compute_logits(hidden [N, D]) -> float32 [N, V].

    kv_caches[i] is layer i's latent cache [NB, BS, kv_cache_dim]. With ep_size > 1 each MoE layer holds
    experts [ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size) and `expert_dispatch` reaches the others.
    INT4 routed experts stay packed when `pack_experts` (default: kernel_backend == "triton") and run through
    fused_moe_int4; otherwise the loader dequantizes them to `dtype`. With an `expert_map` (redundant experts)
    each MoE layer holds physical experts [ep_rank * P / ep_size, (ep_rank + 1) * P / ep_size) instead and the
    router maps logical ids to physical ones (expert_map.py).
    """

    def __init__(
        self,
        args: ModelArgs,
        kernel_backend: KernelBackend = "torch",
        dtype: torch.dtype = torch.bfloat16,
        ep_rank: int = 0,
        ep_size: int = 1,
        expert_dispatch: ExpertDispatch | None = None,
        pack_experts: bool | None = None,
        expert_map: ExpertMap | None = None,
    ):
        super().__init__()
        if expert_map is not None:
            expert_map.check_matches(args, ep_size)
        elif args.n_routed_experts % ep_size:
            raise ValueError(f"n_routed_experts={args.n_routed_experts} does not divide by ep_size={ep_size}")
        if ep_size > 1 and expert_dispatch is None:
            raise ValueError("ep_size > 1 needs an expert_dispatch to reach the other workers' experts")
        self.args = args
        self.kernel_backend = kernel_backend
        self.dtype = dtype
        self.ep_rank, self.ep_size = ep_rank, ep_size
        self.expert_map = expert_map
        kernels = Kernels.for_backend(kernel_backend)
        num_local = args.n_routed_experts // ep_size if expert_map is None else expert_map.num_local_experts
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size, dtype=dtype)
        keep_packed = kernel_backend == "triton" if pack_experts is None else pack_experts
        layers = []
        for layer_id in range(args.num_hidden_layers):
            placement = None
            if args.is_moe_layer(layer_id):
                packed = keep_packed and routed_experts_are_packed(args, layer_id)
                physical_to_logical = None if expert_map is None else expert_map.layer(layer_id)
                placement = ExpertPlacement(ep_rank * num_local, num_local, packed, expert_dispatch,
                                            physical_to_logical, replica_offset=ep_rank)
            layers.append(Block(args, kernels, dtype, placement))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps, dtype)
        self.head = _linear(args.hidden_size, args.vocab_size, dtype)
        self.rope_attention_factor = yarn_attention_factor(args.rope_scaling)
        self.register_buffer("rope_inv_freq", torch.empty(args.qk_rope_head_dim // 2), persistent=False)
        self.init_non_checkpoint_state()

    def init_non_checkpoint_state(self) -> None:
        """Rope table + weight tying; the loader calls it again after materialising from the meta device
        (`to_empty` allocates tied parameters separately)."""
        if self.args.tie_word_embeddings:
            self.head.weight = self.embed.weight
        if self.rope_inv_freq.device.type != "meta":
            self.rope_inv_freq.copy_(rope_inv_freq(self.args))
            for moe in self.moe_layers:
                moe.init_routing_tables()
            self.take_expert_load()

    @property
    def moe_layers(self) -> list[MoE]:
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    @property
    def num_physical_experts(self) -> int:
        return self.args.n_routed_experts if self.expert_map is None else self.expert_map.num_physical_experts

    def take_expert_load(self) -> ExpertLoad:
        """Tokens routed to each expert since the last take, on the model's device (no host sync), and restart
        the count. Summed over an EP group, each MoE layer's row adds up to tokens x num_experts_per_tok."""
        return self._expert_load(restart=True)

    def expert_load(self) -> ExpertLoad:
        """take_expert_load without the restart: safe to read while another thread runs the forward."""
        return self._expert_load(restart=False)

    def _expert_load(self, restart: bool) -> ExpertLoad:
        device = self.rope_inv_freq.device
        counts = [moe.token_counts(restart) for moe in self.moe_layers]
        if not counts:
            return ExpertLoad(torch.zeros(0, self.args.n_routed_experts, dtype=torch.int64, device=device),
                              torch.zeros(0, self.num_physical_experts, dtype=torch.int64, device=device))
        return ExpertLoad(torch.stack([c[0] for c in counts]), torch.stack([c[1] for c in counts]))

    def take_expert_token_counts(self) -> torch.Tensor:
        """take_expert_load().logical: int64 [num MoE layers, E]."""
        return self.take_expert_load().logical

    @property
    def expert_range(self) -> range:
        """The physical expert ids this worker holds in every MoE layer."""
        num_local = self.num_physical_experts // self.ep_size
        return range(self.ep_rank * num_local, (self.ep_rank + 1) * num_local)

    def parameter_bytes(self) -> ParameterBytes:
        """Bytes of weights this worker holds (parameters and packed-expert buffers; tied weights once)."""
        tensors = dict(self.named_parameters()) | {
            name: buf for name, buf in self.named_buffers() if ".ffn.experts." in name
        }
        routed = sum(t.numel() * t.element_size() for name, t in tensors.items() if ".ffn.experts." in name)
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        return ParameterBytes(routed, total - routed)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"got {len(kv_caches)} kv caches for {len(self.layers)} layers")
        h = self.embed(input_ids)  # [T, D]
        cos, sin = rope_cos_sin(positions, self.rope_inv_freq, self.rope_attention_factor)  # [T, R / 2]
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            h = layer(h, cos, sin, kv_cache, attn_metadata)
        return self.norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).float()  # [N, V]

