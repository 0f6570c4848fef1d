"""Make ``import blockzoo`` work from a checkout that is not pip-installed (the GPU machine runs
from a copy of the tree): expose the repository root as the package ``blockzoo``."""

import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def warm_up(seconds: float = 3.0) -> None:
    """Keep the GPU busy before the first timing: without it the first shape's first timings
    came out up to 2x slow (session 12, bench/moc_gpu.py)."""
    import time

    import torch
    x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        x @ x
        torch.cuda.synchronize()


def ensure_blockzoo() -> None:
    try:
        import blockzoo  # noqa: F401
        return
    except ImportError:
        pass
    link_dir = pathlib.Path(tempfile.mkdtemp(prefix="bzpath-"))
    os.symlink(ROOT, link_dir / "blockzoo")
    sys.path.insert(0, str(link_dir))
