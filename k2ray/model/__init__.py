"""The Kimi K2 / DeepSeek-V3 model: `args.ModelArgs`, `deepseek_v3.Transformer`, `loader.load_model`,
`quantize.quantize_checkpoint`, `tiny_checkpoint` (the random k2-tiny test checkpoint). Those are imported by
module; only the embedded checkpoints' directories are re-exported here, since they and this package
stay free of torch."""

from k2ray.model.default_checkpoint import (
    DEFAULT_CHECKPOINT_NAME,
    default_checkpoint_dir,
    tiny_checkpoint_dir,
)

__all__ = ["DEFAULT_CHECKPOINT_NAME", "default_checkpoint_dir", "tiny_checkpoint_dir"]
