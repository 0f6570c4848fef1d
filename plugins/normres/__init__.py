"""normres.* components: pre-norm + residual units (fused residual add + norm)."""
