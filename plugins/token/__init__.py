"""token.* components: inference-time KV-cache policies (which cached tokens to keep)."""
