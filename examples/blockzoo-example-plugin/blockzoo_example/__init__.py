"""blockzoo-example-plugin: ``example.shortconv`` (a causal depthwise short convolution token
mixer with a PyTorch reference and a Numba CPU backend) and the ``example_lag`` evaluation task.

Nothing here is imported by blockzoo until its registry loads (entry point ``blockzoo:example``).
"""

__version__ = "0.1.0"
