"""The Kimi K2 / DeepSeek-V3 model: `args.ModelArgs`, `deepseek_v3.Transformer`, `loader.load_model`,
`quantize.quantize_checkpoint`, `tiny_checkpoint` (the embedded demo checkpoint). Imported by module so that
`k2ray.model.default_checkpoint` stays free of torch."""
