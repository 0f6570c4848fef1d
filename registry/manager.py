"""Plugin manager: lazy, guarded loading of built-in and entry-point plugins.

Environment switches (as in pytest / tox):

- ``BLOCKZOO_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins (built-ins still load).
- ``BLOCKZOO_BLOCK_PLUGINS=a,b``: skip the entry points (or built-ins) with these names.
- ``BLOCKZOO_PLUGINS_STRICT=1``: re-raise the first plugin failure instead of recording it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import traceback
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pluggy

from . import hookspecs
from .registry import Registry, RegistryError

ENTRY_POINT_GROUP = "blockzoo"

BUILTIN_PLUGINS = (
    "blockzoo.plugins.attention.plugin",
    "blockzoo.plugins.normres.plugin",
    "blockzoo.plugins.mlp.plugin",
    "blockzoo.plugins.context.plugin",
    "blockzoo.plugins.precision.plugin",
    "blockzoo.plugins.flow.plugin",
    "blockzoo.plugins.depth.plugin",
    "blockzoo.plugins.token.plugin",
    "blockzoo.plugins.token.backends",
    "blockzoo.plugins.token.temf.plugin",
    "blockzoo.plugins.token.membank.plugin",
    "blockzoo.core.tasks",
)

HOOKS = ("blockzoo_register_components", "blockzoo_register_backends", "blockzoo_register_tasks")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


@dataclass
class PluginFailure:
    plugin: str
    dist: str
    version: str
    stage: str
    error: str
    traceback: str

    def as_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


@dataclass
class PluginInfo:
    name: str
    dist: str
    version: str
    builtin: bool


class PluginManager:
    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.failures: list[PluginFailure] = []
        self.plugins: dict[str, PluginInfo] = {}
        self._loaded = False
        self._lock = threading.RLock()

    # -- loading ------------------------------------------------------------------------------
    def _record(self, info: PluginInfo, stage: str, exc: BaseException) -> None:
        if _flag("BLOCKZOO_PLUGINS_STRICT"):
            raise exc
        self.failures.append(PluginFailure(
            plugin=info.name, dist=info.dist, version=info.version, stage=stage,
            error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()))

    def _register_object(self, obj: Any, info: PluginInfo) -> None:
        try:
            self.pm.register(obj, name=info.name)
            self.pm.check_pending()
        except Exception as exc:  # noqa: BLE001 - any plugin error is recorded
            if self.pm.is_registered(obj):
                self.pm.unregister(obj)
            self._record(info, "register", exc)
            return
        self.plugins[info.name] = info

    def load(self) -> None:
        with self._lock:
            if self._loaded:
                return
            self._loaded = True
            blocked = {s.strip() for s in os.environ.get("BLOCKZOO_BLOCK_PLUGINS", "").split(",") if s.strip()}
            version = _own_version()
            for modname in BUILTIN_PLUGINS:
                short = modname.split(".")[-2] if modname.endswith(".plugin") else modname.split(".")[-1]
                if modname in blocked or short in blocked:
                    continue
                info = PluginInfo(name=modname, dist="blockzoo", version=version, builtin=True)
                try:
                    module = importlib.import_module(modname)
                except Exception as exc:  # noqa: BLE001
                    self._record(info, "import", exc)
                    continue
                self._register_object(module, info)
            if not _flag("BLOCKZOO_DISABLE_PLUGIN_AUTOLOAD"):
                for ep in _entry_points():
                    if ep.name in blocked:
                        continue
                    dist = ep.dist.name if ep.dist else "?"
                    info = PluginInfo(name=ep.name, dist=dist,
                                      version=ep.dist.version if ep.dist else "?", builtin=False)
                    if ep.name in self.plugins:
                        self._record(info, "load", RegistryError(
                            f"plugin name {ep.name!r} from {dist} is already used by "
                            f"{self.plugins[ep.name].dist}"))
                        continue
                    try:
                        obj = ep.load()
                    except Exception as exc:  # noqa: BLE001
                        self._record(info, "import", exc)
                        continue
                    self._register_object(obj, info)
            self._call_register_hooks()

    def register(self, obj: ModuleType | Any, name: str | None = None) -> None:
        """Register a plugin object at run time (tests, notebooks) and call its hooks."""
        self.load()
        name = name or getattr(obj, "__name__", repr(obj))
        info = PluginInfo(name=name, dist="(runtime)", version="", builtin=False)
        before = set(self.pm.get_plugins())
        self._register_object(obj, info)
        if obj in before or not self.pm.is_registered(obj):
            return
        self._call_register_hooks(only=obj)

    def _call_register_hooks(self, only: Any = None) -> None:
        for hook_name in HOOKS:
            hook = getattr(self.pm.hook, hook_name)
            for impl in hook.get_hookimpls():  # registration order
                if only is not None and impl.plugin is not only:
                    continue
                info = self.plugins.get(impl.plugin_name) or PluginInfo(impl.plugin_name, "?", "?", False)
                owner = info.name if info.builtin else f"{info.dist} {info.version} (plugin {info.name!r})"
                self.registry.current_owner = owner
                try:
                    impl.function(registry=self.registry)
                except Exception as exc:  # noqa: BLE001
                    self._record(info, hook_name, exc)
                finally:
                    self.registry.current_owner = "?"
        known = {f.error for f in self.failures}
        for component, problem in self.registry.validate():
            if f"RegistryError: {problem}" in known:
                continue
            info = PluginInfo(name=component.owner, dist=component.owner, version="", builtin=False)
            try:
                raise RegistryError(problem)
            except RegistryError as exc:
                self._record(info, "validate", exc)

    def select_backend(self, op: str, inputs: Any, candidates: list[Any]) -> Any:
        return self.pm.hook.blockzoo_select_backend(op=op, inputs=inputs, candidates=candidates)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name)


def _own_version() -> str:
    try:
        return importlib.metadata.version("blockzoo")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


_MANAGER: PluginManager | None = None
_MANAGER_LOCK = threading.Lock()


def get_manager() -> PluginManager:
    """The process-wide plugin manager, loaded on first use (never at import time)."""
    global _MANAGER
    with _MANAGER_LOCK:
        if _MANAGER is None:
            _MANAGER = PluginManager()
    _MANAGER.load()
    return _MANAGER


def get_registry() -> Registry:
    return get_manager().registry


def reset_manager() -> None:
    """Forget every loaded plugin (tests use this after changing environment switches)."""
    global _MANAGER
    with _MANAGER_LOCK:
        _MANAGER = None
    from . import dispatch

    dispatch.clear_caches()
