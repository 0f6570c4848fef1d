"""The typed registry that hooks receive: components, backends and evaluation tasks."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from .capabilities import Capabilities, Inputs


class RegistryError(Exception):
    """A registration or lookup error (duplicate ids, unknown names)."""


def suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean 'x'?)' or a list of valid names when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    if close:
        return f"did you mean {close[0]!r}?"
    if choices:
        return "valid names: " + ", ".join(sorted(choices))
    return "nothing is registered"


@dataclass
class Case:
    """One input configuration for the generated conformance tests.

    shapes: tensor argument -> shape (None = not given). Tensors are drawn fresh from
    N(offset, scale^2) for every check. grad: the arguments whose gradients are compared
    (default: every floating tensor given).
    """

    id: str
    shapes: dict[str, tuple[int, ...] | None]
    params: dict[str, Any] = field(default_factory=dict)
    grad: tuple[str, ...] | None = None
    offset: dict[str, float] = field(default_factory=dict)
    scale: dict[str, float] = field(default_factory=dict)
    head_dim: int | None = None


@dataclass
class Component:
    """A component: the functional op's contract plus how to build its module.

    id: ``family.name``. slot: where it goes in a block spec ("mixer", "normres", "mlp", ...).
    params: pydantic model of its parameters (``extra="forbid"``); the functional op takes them as
    keyword arguments, ``op_params`` names those the kernel receives (default: all).
    module: ``(model_spec, params) -> nn.Module`` factory used by the composer.
    describe: ``(*args, **kwargs) -> Inputs`` for dispatch of a functional call.
    cases: ``() -> list[Case]`` input configurations for the generated conformance matrix.
    flops: optional analytic forward FLOPs ``(Inputs, params) -> float``.
    bench_cases: ``device -> list[Case]`` shapes for ``blockzoo bench``; baselines:
    ``device -> {name: fn}`` non-blockzoo implementations timed in the same run (SDPA, torch
    eager); cost: ``(shapes, params, mode) -> {"flops": ..} or {"bytes": ..}`` for rates.
    kv_bytes: ``(BuildContext, params, seq) -> bytes`` a mixer keeps for decoding one sequence
    of ``seq`` tokens (default for mixers: the dense cache, 2 * seq * kv_heads * head_dim).
    tolerance: optional ``(dtype, kind, backend, device) -> Tolerance | None`` overriding the
    conformance tolerance table for this component (None: the table). For components whose
    reference emulates a rounding (quantised ops), where the table's bounds for smooth ops do
    not apply; the component's docs must justify the values.
    oracle: optional ``(backend, device) -> oracle | None`` for ops with data-dependent discrete
    decisions (a threshold on a score) that a backend may make differently from the reference
    where its arithmetic rounds differently (e.g. a low-precision tensor-core dot). The oracle
    has a context manager ``capture()`` inside which the conformance check runs the backend, and
    ``reference(**inputs, **params)``, the reference evaluated with the decisions the backend
    made there; the output must then match it at the normal tolerance. The component must test
    separately that the backend's decisions differ from the exact ones only within its rounding.
    accuracy: optional ``(fn, tensors, kwargs) -> {metric: value}`` for approximate ops:
    ``blockzoo bench`` calls it for each backend's forward and reports the metrics (e.g. cosine
    similarity, relative L1, RMSE vs fp32 attention) beside the times.
    """

    id: str
    slot: str
    params: type[BaseModel]
    describe: Callable[..., Inputs]
    module: Callable[..., Any] | None = None
    cases: Callable[[], list[Case]] | None = None
    op_params: tuple[str, ...] | None = None
    flops: Callable[..., float] | None = None
    bench_cases: Callable[[str], list[Case]] | None = None
    baselines: Callable[[str], dict[str, Callable[..., Any]]] | None = None
    cost: Callable[[dict[str, tuple[int, ...]], Any, str], dict[str, float]] | None = None
    kv_bytes: Callable[[Any, Any, int], float] | None = None
    tolerance: Callable[..., Any] | None = None
    oracle: Callable[[str, str], Any] | None = None
    accuracy: Callable[..., dict[str, float]] | None = None
    doc: str = ""
    source: str = ""
    owner: str = ""

    @property
    def family(self) -> str:
        return self.id.split(".", 1)[0]


@dataclass
class Backend:
    """One implementation of a component's functional op.

    fn takes the component's positional tensors and the op params as keyword arguments.
    priority: higher wins in ``auto`` dispatch (reference 0, numba 20, triton 30 by convention).
    """

    component: str
    name: str
    fn: Callable[..., Any]
    capabilities: Capabilities = field(default_factory=Capabilities)
    priority: int = 0
    doc: str = ""
    owner: str = ""

    def not_supported_reasons(self, inputs: Inputs) -> list[str]:
        return self.capabilities.reasons(inputs)

    @property
    def key(self) -> str:
        return f"{self.component}:{self.name}"


@dataclass
class Task:
    """An evaluation task: ``run(model_factory, config) -> dict[str, float]``."""

    name: str
    run: Callable[..., dict[str, float]]
    params: type[BaseModel] | None = None
    doc: str = ""
    owner: str = ""


class Registry:
    """Holds what plugins registered. Hooks receive this object."""

    def __init__(self) -> None:
        self.components: dict[str, Component] = {}
        self.backends: dict[str, dict[str, Backend]] = {}
        self.tasks: dict[str, Task] = {}
        self.current_owner = "?"

    # -- registration -------------------------------------------------------------------------
    def add_component(self, component: Component) -> None:
        if "." not in component.id:
            raise RegistryError(f"component id {component.id!r} must be 'family.name'")
        component.owner = component.owner or self.current_owner
        if component.id in self.components:
            other = self.components[component.id].owner
            raise RegistryError(
                f"duplicate component id {component.id!r}: registered by {other} and by {component.owner}")
        self.components[component.id] = component
        self.backends.setdefault(component.id, {})

    def add_backend(self, backend: Backend) -> None:
        backend.owner = backend.owner or self.current_owner
        if backend.component not in self.components:
            raise RegistryError(
                f"backend {backend.name!r} for unknown component {backend.component!r} "
                f"({suggest(backend.component, tuple(self.components))})")
        table = self.backends[backend.component]
        if backend.name in table:
            raise RegistryError(
                f"duplicate backend {backend.key!r}: registered by {table[backend.name].owner} "
                f"and by {backend.owner}")
        table[backend.name] = backend

    def add_task(self, task: Task) -> None:
        task.owner = task.owner or self.current_owner
        if task.name in self.tasks:
            raise RegistryError(
                f"duplicate task {task.name!r}: registered by {self.tasks[task.name].owner} and by {task.owner}")
        self.tasks[task.name] = task

    # -- lookup -------------------------------------------------------------------------------
    def component(self, cid: str) -> Component:
        try:
            return self.components[cid]
        except KeyError:
            raise RegistryError(f"unknown component {cid!r}: {suggest(cid, tuple(self.components))}") from None

    def backends_for(self, cid: str) -> list[Backend]:
        self.component(cid)
        return sorted(self.backends[cid].values(), key=lambda b: -b.priority)

    def backend(self, cid: str, name: str) -> Backend:
        table = self.backends.get(self.component(cid).id, {})
        if name not in table:
            raise RegistryError(f"component {cid!r} has no backend {name!r}: {suggest(name, tuple(table))}")
        return table[name]

    def validate(self) -> list[tuple[Component, str]]:
        """Components that cannot be used (no reference backend), with the reason."""
        return [(c, f"component {cid!r} (from {c.owner}) has no 'reference' backend")
                for cid, c in self.components.items() if "reference" not in self.backends.get(cid, {})]
