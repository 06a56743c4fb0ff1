"""Load a K2 / DeepSeek-V3 safetensors checkpoint into `Transformer` without allocating weights twice.

The model is built on the meta device, materialised empty on the target device, and every checkpoint tensor
is copied straight into its slot, one tensor at a time. HF names map to ours through MODULE_MAP; routed
experts are stacked into [El, ...] tensors. compressed-tensors pack-quantized Linears (weight_packed +
weight_scale + weight_shape) stay packed for the triton backend's fused MoE and are dequantized once here
otherwise. An expert-parallel worker reads only its own routed experts' tensors (safetensors maps the file;
a tensor never asked for is never read), plus the replicated ones; `LoadReport` says how much it read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from k2ray.kernels import dequantize_int4

from .args import ModelArgs
from .deepseek_v3 import ExpertDispatch, KernelBackend, Transformer
from .expert_map import ExpertMap

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Show a progress bar only when loading takes a while.
PROGRESS_MIN_TENSORS = 2000
PACKED_LEAVES = ("weight_packed", "weight_scale", "weight_shape")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExpertSlot:
    """Where one routed-expert projection lands in the stacked tensors of `RoutedExperts`."""

    stack: str  # "w13" or "w2"
    row_block: int  # w13: 0 = gate_proj rows [0, I), 1 = up_proj rows [I, 2I)


# HF module name (fullmatch; group 1 = layer, group 2 = expert) -> our module name or expert slot.
# `is_linear` marks modules compressed-tensors' "Linear" target can quantize.
LAYER = r"model\.layers\.(\d+)\."
MODULE_MAP: tuple[tuple[str, str | ExpertSlot, bool], ...] = (
    (r"model\.embed_tokens", "embed", False),
    (r"model\.norm", "norm", False),
    (r"lm_head", "head", True),
    (LAYER + r"input_layernorm", "layers.{0}.attn_norm", False),
    (LAYER + r"post_attention_layernorm", "layers.{0}.ffn_norm", False),
    (LAYER + r"self_attn\.q_proj", "layers.{0}.attn.wq", True),
    (LAYER + r"self_attn\.q_a_proj", "layers.{0}.attn.wq_a", True),
    (LAYER + r"self_attn\.q_a_layernorm", "layers.{0}.attn.q_norm", False),
    (LAYER + r"self_attn\.q_b_proj", "layers.{0}.attn.wq_b", True),
    (LAYER + r"self_attn\.kv_a_proj_with_mqa", "layers.{0}.attn.wkv_a", True),
    (LAYER + r"self_attn\.kv_a_layernorm", "layers.{0}.attn.kv_norm", False),
    (LAYER + r"self_attn\.kv_b_proj", "layers.{0}.attn.wkv_b", True),
    (LAYER + r"self_attn\.o_proj", "layers.{0}.attn.wo", True),
    (LAYER + r"mlp\.gate_proj", "layers.{0}.ffn.w1", True),
    (LAYER + r"mlp\.up_proj", "layers.{0}.ffn.w3", True),
    (LAYER + r"mlp\.down_proj", "layers.{0}.ffn.w2", True),
    (LAYER + r"mlp\.shared_experts\.gate_proj", "layers.{0}.ffn.shared_experts.w1", True),
    (LAYER + r"mlp\.shared_experts\.up_proj", "layers.{0}.ffn.shared_experts.w3", True),
    (LAYER + r"mlp\.shared_experts\.down_proj", "layers.{0}.ffn.shared_experts.w2", True),
    (LAYER + r"mlp\.gate", "layers.{0}.ffn.gate", False),
    (LAYER + r"mlp\.experts\.(\d+)\.gate_proj", ExpertSlot("w13", 0), True),
    (LAYER + r"mlp\.experts\.(\d+)\.up_proj", ExpertSlot("w13", 1), True),
    (LAYER + r"mlp\.experts\.(\d+)\.down_proj", ExpertSlot("w2", 0), True),
)
_COMPILED = tuple((re.compile(p), target, is_linear) for p, target, is_linear in MODULE_MAP)
_EXPERT_MODULE = re.compile(LAYER + r"mlp\.experts\.(\d+)\.(?:gate_proj|up_proj|down_proj)")


class CheckpointError(ValueError):
    """The checkpoint's tensors do not match its config.json."""


def checkpoint_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / INDEX_FILE
    if index.exists():
        with open(index) as f:
            return [checkpoint_dir / name for name in sorted(set(json.load(f)["weight_map"].values()))]
    if (checkpoint_dir / SINGLE_FILE).exists():
        return [checkpoint_dir / SINGLE_FILE]
    raise FileNotFoundError(f"no {INDEX_FILE} or {SINGLE_FILE} in {checkpoint_dir}")


def iter_checkpoint(
    files: list[Path], is_wanted: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors whose name `is_wanted`; the others are not read."""
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a Mapping
                if is_wanted(name):
                    yield name, f.get_tensor(name)


@dataclass(frozen=True)
class LoadReport:
    """What one load read from the checkpoint (an EP worker skips the other workers' experts)."""

    num_tensors_read: int
    num_bytes_read: int
    num_tensors_skipped: int


def resolve_dtype(dtype: torch.dtype | str, args: ModelArgs) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    elif dtype == "auto":
        resolved = _DTYPES.get(args.torch_dtype or "bfloat16", torch.bfloat16)
    elif dtype in _DTYPES:
        resolved = _DTYPES[dtype]
    else:
        raise ValueError(f"unsupported dtype {dtype!r}: expected auto, {', '.join(_DTYPES)}")
    if resolved not in _DTYPES.values():
        raise ValueError(f"unsupported dtype {resolved}: expected one of {list(_DTYPES.values())}")
    return resolved


def load_model(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    kernel_backend: KernelBackend = "torch",
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_dispatch: ExpertDispatch | None = None,
    pack_experts: bool | None = None,
    ep_placement: ExpertMap | str | Path | None = None,
) -> Transformer:
    """Build `Transformer` for the checkpoint (model.args holds its ModelArgs) with weights on `device`.

    dtype: torch dtype or "auto" (config torch_dtype) / "bfloat16" / "float16" / "float32". The remaining
    arguments go to Transformer (expert parallelism, INT4 experts packed vs dequantized at load);
    `ep_placement` is an ExpertMap or its JSON file (redundant experts).
    """
    return load_model_with_report(checkpoint_dir, dtype, device, kernel_backend, ep_rank, ep_size, expert_dispatch,
                                  pack_experts, ep_placement)[0]


def load_model_with_report(
    checkpoint_dir: str | Path,
    dtype: torch.dtype | str = "auto",
    device: str | torch.device = "cpu",
    kernel_backend: KernelBackend = "torch",
    ep_rank: int = 0,
    ep_size: int = 1,
    expert_dispatch: ExpertDispatch | None = None,
    pack_experts: bool | None = None,
    ep_placement: ExpertMap | str | Path | None = None,
) -> tuple[Transformer, LoadReport]:
    """load_model, and what it read from the checkpoint."""
    checkpoint_dir = Path(checkpoint_dir)
    args = ModelArgs.from_checkpoint(checkpoint_dir)
    model_dtype = resolve_dtype(dtype, args)
    expert_map = ExpertMap.load(ep_placement) if isinstance(ep_placement, str | Path) else ep_placement
    with torch.device("meta"):
        model = Transformer(args, kernel_backend, model_dtype, ep_rank, ep_size, expert_dispatch, pack_experts,
                            expert_map)
    model.to_empty(device=device)
    model.init_non_checkpoint_state()
    report = _WeightSink(model).load(checkpoint_files(checkpoint_dir))
    held = model.parameter_bytes()
    logger.info("EP rank %d of %d: read %d checkpoint tensors (%d bytes, skipped %d); holds %d bytes of weights, "
                "%d of them routed experts", ep_rank, ep_size, report.num_tensors_read, report.num_bytes_read,
                report.num_tensors_skipped, held.total, held.routed_experts)
    model.requires_grad_(False)
    return model.eval(), report


class _WeightSink:
    """Routes checkpoint tensors into the materialised model and checks nothing is missing."""

    def __init__(self, model: Transformer):
        self.model = model
        self.args = model.args
        self.quant = model.args.quantization
        # remove_duplicate=False keeps head.weight addressable when it is tied to embed.weight.
        self.tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
        # Per MoE layer: logical expert -> the local slots holding it (several with redundant experts).
        self.local_slots: dict[int, dict[int, list[int]]] = {}
        for layer_id, layer in enumerate(model.layers):
            if self.args.is_moe_layer(layer_id):
                slots = self.local_slots.setdefault(layer_id, {})
                for local, logical in enumerate(layer.ffn.local_logical_ids):
                    slots.setdefault(logical, []).append(local)
        self.num_tensors_read = self.num_bytes_read = self.num_tensors_skipped = 0
        self.filled: set[tuple] = set()
        self.pending: dict[tuple, dict[str, torch.Tensor]] = {}  # packed pieces waiting for their partner

    @torch.no_grad()
    def load(self, files: list[Path]) -> LoadReport:
        total = self._count(files)
        with tqdm(total=total, desc="Loading weights", unit="tensor", disable=total < PROGRESS_MIN_TENSORS) as bar:
            for name, tensor in iter_checkpoint(files, self.is_wanted):
                self.num_tensors_read += 1
                self.num_bytes_read += tensor.numel() * tensor.element_size()
                self._route(name, tensor)
                bar.update(1)
            bar.update(self.num_tensors_skipped)
        if self.pending:
            raise CheckpointError(f"incomplete packed weights (need weight_packed + weight_scale): {list(self.pending)[:4]}")
        missing = self._expected() - self.filled
        if missing:
            raise CheckpointError(f"{len(missing)} model tensors missing from the checkpoint, e.g. {sorted(missing)[:4]}")
        return LoadReport(self.num_tensors_read, self.num_bytes_read, self.num_tensors_skipped)

    def is_wanted(self, name: str) -> bool:
        """False for another EP worker's routed expert: the tensor is skipped unread."""
        match = _EXPERT_MODULE.fullmatch(name.rpartition(".")[0])
        if match is None:
            return True
        layer, expert = int(match.group(1)), int(match.group(2))
        # Layers past the last are multi-token-prediction ones: _route skips them, so nothing reads them either.
        is_wanted = layer < self.args.num_hidden_layers and expert in self.local_slots.get(layer, {})
        self.num_tensors_skipped += not is_wanted
        return is_wanted

    @staticmethod
    def _count(files: list[Path]) -> int:
        count = 0
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                count += len(list(f.keys()))
        return count

    def _route(self, name: str, tensor: torch.Tensor) -> None:
        module, _, leaf = name.rpartition(".")
        for pattern, target, is_linear in _COMPILED:
            match = pattern.fullmatch(module)
            if match is None:
                continue
            groups = match.groups()
            if groups and int(groups[0]) >= self.args.num_hidden_layers:
                return  # multi-token-prediction layers after the last layer: not served
            self._check_format(module, leaf, is_linear)
            if isinstance(target, ExpertSlot):
                self._route_expert(int(groups[0]), int(groups[1]), target, leaf, tensor)
            else:
                self._route_plain(target.format(*groups), leaf, tensor)
            return
        raise CheckpointError(f"unexpected checkpoint tensor {name!r}")

    def _check_format(self, module: str, leaf: str, is_linear: bool) -> None:
        if not is_linear:
            return
        quantized = self.quant is not None and self.quant.is_quantized(module)
        if leaf in PACKED_LEAVES and not quantized:
            raise CheckpointError(f"{module} is stored packed but quantization_config does not quantize it "
                                  "(it is ignored or there is no quantization_config)")
        if leaf == "weight" and quantized:
            raise CheckpointError(f"{module} is stored dense but quantization_config.ignore does not list it")

    def _route_plain(self, ours: str, leaf: str, tensor: torch.Tensor) -> None:
        if leaf in PACKED_LEAVES:
            self._collect_packed((ours,), leaf, tensor, lambda w: self._copy(f"{ours}.weight", w, (ours, "weight")))
            return
        self._copy(f"{ours}.{leaf}", tensor, (ours, leaf))

    def _copy(self, ours: str, tensor: torch.Tensor, key: tuple, index: tuple = ()) -> None:
        if ours not in self.tensors and tensor.numel() == 0:
            return  # transformers saves zero-width shared experts when n_shared_experts is 0
        if ours not in self.tensors:
            raise CheckpointError(f"checkpoint tensor for {ours!r} has no place in the model (config mismatch?)")
        dst = self.tensors[ours][index] if index else self.tensors[ours]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise CheckpointError(f"{ours}{list(index)}: checkpoint shape {tuple(tensor.shape)} != {tuple(dst.shape)}")
        dst.copy_(tensor)
        self.filled.add(key)

    def _route_expert(self, layer: int, expert: int, slot: ExpertSlot, leaf: str, tensor: torch.Tensor) -> None:
        for local in self.local_slots.get(layer, {}).get(expert, ()):  # none: another EP worker holds it
            self._route_expert_slot(layer, local, slot, leaf, tensor)

    def _route_expert_slot(self, layer: int, local: int, slot: ExpertSlot, leaf: str, tensor: torch.Tensor) -> None:
        prefix = f"layers.{layer}.ffn.experts"
        index = (local, self._expert_rows(slot))
        key = (prefix, slot.stack, local, slot.row_block)
        if leaf == "weight":
            self._copy(f"{prefix}.{slot.stack}", tensor, key, index)
        elif not self.model.layers[layer].ffn.experts.packed:
            self._collect_packed(key, leaf, tensor, lambda w: self._copy(f"{prefix}.{slot.stack}", w, key, index))
        elif leaf == "weight_packed":
            self._copy(f"{prefix}.{slot.stack}_packed", tensor, key + ("packed",), index)
        elif leaf == "weight_scale":
            self._copy(f"{prefix}.{slot.stack}_scale", tensor, key + ("scale",), index)
        # weight_shape needs no storage when the experts stay packed: the buffer shapes already pin it.

    def _expert_rows(self, slot: ExpertSlot) -> slice:
        if slot.stack == "w2":
            return slice(None)
        inter = self.args.moe_intermediate_size
        return slice(slot.row_block * inter, (slot.row_block + 1) * inter)

    def _collect_packed(self, key: tuple, leaf: str, tensor: torch.Tensor, write) -> None:
        parts = self.pending.setdefault(key, {})
        parts[leaf] = tensor
        if "weight_packed" not in parts or "weight_scale" not in parts:
            return
        if "weight_shape" not in parts:
            return  # K2 always stores the shape; wait for it so padding can be trimmed
        del self.pending[key]
        out_features, in_features = (int(v) for v in parts["weight_shape"].tolist())
        device = next(iter(self.tensors.values())).device
        weight = dequantize_int4(
            parts["weight_packed"].to(device), parts["weight_scale"].to(device), self.quant.group_size,
            dtype=self.model.dtype,
        )
        write(weight[:out_features, :in_features])

    def _expected(self) -> set[tuple]:
        expected: set[tuple] = set()
        for name in dict(self.model.named_parameters(remove_duplicate=False)):
            module, _, leaf = name.rpartition(".")
            if ".ffn.experts." in name or (name == "head.weight" and self.args.tie_word_embeddings):
                continue
            expected.add((module, leaf))
        for layer_id, layer in enumerate(self.model.layers):
            if not self.args.is_moe_layer(layer_id):
                continue
            prefix = f"layers.{layer_id}.ffn.experts"
            parts = (("packed",), ("scale",)) if layer.ffn.experts.packed else ((),)
            for local in range(layer.ffn.experts.num_local_experts):
                for stack, row_block in (("w13", 0), ("w13", 1), ("w2", 0)):
                    expected |= {(prefix, stack, local, row_block) + part for part in parts}
        return expected
