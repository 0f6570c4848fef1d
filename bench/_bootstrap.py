"""Make ``import blockzoo`` work from a checkout that is not pip-installed (the GPU machine runs
from a copy of the tree): expose the repository root as the package ``blockzoo``."""

import os
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def ensure_blockzoo() -> None:
    try:
        import blockzoo  # noqa: F401
        return
    except ImportError:
        pass
    link_dir = pathlib.Path(tempfile.mkdtemp(prefix="bzpath-"))
    os.symlink(ROOT, link_dir / "blockzoo")
    sys.path.insert(0, str(link_dir))
