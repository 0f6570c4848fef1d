"""Plugin registry: hookspecs, plugin manager, component/backend/task registries, dispatch."""

from .capabilities import Capabilities, Inputs
from .dispatch import BackendUnavailable, explain, resolve
from .hookspecs import hookimpl, hookspec
from .manager import get_manager, get_registry, reset_manager
from .registry import Backend, Case, Component, Registry, RegistryError, Task, suggest

__all__ = [
    "Backend", "BackendUnavailable", "Case", "Capabilities", "Component", "Inputs", "Registry",
    "RegistryError", "Task", "explain", "get_manager", "get_registry", "hookimpl", "hookspec",
    "reset_manager", "resolve", "suggest",
]
