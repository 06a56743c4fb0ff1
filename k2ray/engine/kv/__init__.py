"""The paged latent KV cache: block pool with prefix caching, the per-request manager, and the contracts of KV moved between engines."""
