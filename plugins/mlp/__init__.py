"""mlp.* components: SwiGLU and GELU feed-forward blocks."""
