"""context.* components: context sparsity (Mixture of Contexts chunk routing)."""
