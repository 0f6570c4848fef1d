"""Hook specifications: the one interface built-in and third-party plugins share.

A plugin is any module or object with functions decorated by :data:`hookimpl` whose names match
the specs below. Built-in components register through exactly these hooks (see ``plugins/``).
Third-party packages expose their plugin through the ``blockzoo`` entry-point group::

    [project.entry-points.blockzoo]
    myplugin = "my_package.plugin"
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

PROJECT = "blockzoo"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

if TYPE_CHECKING:  # pragma: no cover
    from .capabilities import Inputs
    from .registry import Backend, Registry


@hookspec
def blockzoo_register_components(registry: Registry) -> None:
    """Register components with ``registry.add_component(Component(...))``."""


@hookspec
def blockzoo_register_backends(registry: Registry) -> None:
    """Register backends with ``registry.add_backend(Backend(...))``.

    Called after every plugin's components are registered, so a plugin may add a backend to a
    component another package owns.
    """


@hookspec
def blockzoo_register_tasks(registry: Registry) -> None:
    """Register evaluation tasks / metrics with ``registry.add_task(Task(...))``."""


@hookspec(firstresult=True)
def blockzoo_select_backend(op: str, inputs: Inputs, candidates: list[Backend]) -> Any:
    """Policy: return the name of the backend to use for ``op`` on ``inputs``, or None to defer.

    ``candidates`` are the backends with no not-supported reasons, highest priority first.
    """
