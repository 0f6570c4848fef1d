"""A Python generator of specs for sweep files (``generator: sweep_generators:widths``)."""

import copy


def widths(base):
    for d in (16, 32):
        spec = copy.deepcopy(base)
        spec.setdefault("model", {})["d_model"] = d
        yield f"width {d}", spec
