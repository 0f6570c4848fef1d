"""attention.* components: the dense causal/non-causal softmax attention baseline."""
