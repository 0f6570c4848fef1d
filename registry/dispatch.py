"""Backend selection with reasons.

``auto``: the policy hook first, then priority; the first backend with no reasons wins; the
reference is the fallback, logged once per (component, reasons). A backend asked for by name runs
or raises :class:`BackendUnavailable` with its reasons.
"""

from __future__ import annotations

import logging

from .capabilities import Inputs
from .manager import get_manager
from .registry import Backend, RegistryError

log = logging.getLogger("blockzoo")

_logged: set[tuple[str, str]] = set()


class BackendUnavailable(RegistryError):
    """No backend (or not the requested one) can run the given inputs."""


def clear_caches() -> None:
    _logged.clear()


def _describe_inputs(inputs: Inputs) -> str:
    dt = str(inputs.dtype).removeprefix("torch.")
    parts = [f"device={inputs.device}", f"dtype={dt}"]
    if inputs.head_dim is not None:
        parts.append(f"head_dim={inputs.head_dim}")
    parts.append(f"grad={inputs.requires_grad}")
    return ", ".join(parts)


def _failures_note() -> str:
    failures = get_manager().failures
    if not failures:
        return ""
    lines = [f"  - {f.plugin} ({f.dist} {f.version}) failed at {f.stage}: {f.error}" for f in failures]
    return "\nplugin load failures (see `blockzoo info`):\n" + "\n".join(lines)


def _auto_reasons(backend: Backend, inputs: Inputs) -> list[str]:
    reasons = backend.not_supported_reasons(inputs)
    if not reasons and backend.capabilities.interpreted_on_cpu and inputs.device == "cpu":
        reasons = ["runs only interpreted on the CPU (TRITON_INTERPRET=1, for tests); "
                   f"ask for backend={backend.name!r} explicitly to use it"]
    return reasons


def resolve(component: str, inputs: Inputs, backend: str = "auto") -> Backend:
    """Pick the backend that will run ``component`` on ``inputs``."""
    manager = get_manager()
    registry = manager.registry
    if backend != "auto":
        chosen = registry.backend(component, backend)
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            raise BackendUnavailable(
                f"backend {backend!r} of {component!r} cannot run these inputs "
                f"({_describe_inputs(inputs)}):\n" + "\n".join(f"  - {r}" for r in reasons))
        return chosen
    candidates = registry.backends_for(component)
    report: list[tuple[Backend, list[str]]] = [(b, _auto_reasons(b, inputs)) for b in candidates]
    usable = [b for b, reasons in report if not reasons]
    if usable:
        picked = manager.select_backend(component, inputs, usable)
        if picked is not None:
            name = picked.name if isinstance(picked, Backend) else str(picked)
            for b in usable:
                if b.name == name:
                    return b
            raise BackendUnavailable(
                f"the backend policy chose {name!r} for {component!r}, which is not among the usable "
                f"candidates {[b.name for b in usable]}")
        chosen = usable[0]
        if chosen.name == "reference" and len(candidates) > 1:
            skipped = "; ".join(f"{b.name}: {', '.join(r)}" for b, r in report if r)
            key = (component, skipped)
            if key not in _logged:
                _logged.add(key)
                log.info("blockzoo: %s falls back to the reference backend (%s) [%s]",
                         component, skipped, _describe_inputs(inputs))
        return chosen
    lines = [f"  - {b.name} (from {b.owner}): {'; '.join(r)}" for b, r in report]
    raise BackendUnavailable(
        f"no backend of {component!r} can run these inputs ({_describe_inputs(inputs)}):\n"
        + "\n".join(lines) + _failures_note())


def explain(component: str, inputs: Inputs) -> list[tuple[str, list[str]]]:
    """Every backend of ``component`` with its reasons (empty list = usable)."""
    registry = get_manager().registry
    return [(b.name, b.not_supported_reasons(inputs)) for b in registry.backends_for(component)]
