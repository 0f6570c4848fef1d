"""precision.* components: quantised attention (``precision.int8``, ``precision.qaas``)."""
