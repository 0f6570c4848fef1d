"""depth.* components: Mixture-of-Depths Attention (``depth.moda``) and Mixture-of-Depths token
routing (``depth.mod``)."""
