"""The Kimi K2 / DeepSeek-V3 model: `args.ModelArgs`, `deepseek_v3.Transformer`, `loader.load_model`,
`quantize.quantize_checkpoint`, `tiny_checkpoint` (the embedded demo checkpoint). Those are imported by
module; only `default_checkpoint_dir` is re-exported here, since it and this package stay free of torch."""

from k2ray.model.default_checkpoint import DEFAULT_CHECKPOINT_NAME, default_checkpoint_dir

__all__ = ["DEFAULT_CHECKPOINT_NAME", "default_checkpoint_dir"]
