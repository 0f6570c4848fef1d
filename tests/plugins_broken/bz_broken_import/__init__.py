"""A plugin whose import fails (a missing dependency, as happens with real packages)."""

import blockzoo_dependency_that_does_not_exist  # noqa: F401
