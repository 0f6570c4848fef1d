"""Functional ops: ``blockzoo.op("attention.dense", backend="auto")(q, k, v, causal=True)``.

Tensor arguments go positionally or by name (as the component declares them); every other
keyword is one of the component's params (validated by its pydantic model, so a typo is an error
that names the nearest valid keyword).
"""

from __future__ import annotations

import inspect
from typing import Any

from pydantic import ValidationError

from ..registry import Backend, get_registry, resolve
from ..registry.registry import Component, suggest


class OpArgumentError(TypeError):
    pass


def _tensor_names(component: Component) -> tuple[str, ...]:
    sig = inspect.signature(component.describe)
    return tuple(p for p in sig.parameters if p != "params")


def split_arguments(component: Component, args: tuple, kwargs: dict[str, Any]):
    """-> (tensors by name, validated params model)."""
    names = _tensor_names(component)
    if len(args) > len(names):
        raise OpArgumentError(f"{component.id} takes {len(names)} tensor arguments ({', '.join(names)}), "
                              f"got {len(args)}")
    tensors: dict[str, Any] = dict(zip(names, args, strict=False))
    fields = component.params.model_fields
    raw_params = {}
    for key, value in kwargs.items():
        if key in names:
            if key in tensors:
                raise OpArgumentError(f"{component.id}: {key!r} given twice")
            tensors[key] = value
        elif key in fields:
            raw_params[key] = value
        else:
            raise OpArgumentError(f"{component.id} got an unexpected keyword {key!r}: "
                                  f"{suggest(key, tuple(names) + tuple(fields))}")
    for name in names:
        tensors.setdefault(name, None)
    try:
        params = component.params(**raw_params)
    except ValidationError as exc:
        raise OpArgumentError(f"{component.id}: invalid params: {exc}") from None
    return tensors, params


def op_kwargs(component: Component, params) -> dict[str, Any]:
    names = component.op_params if component.op_params is not None else tuple(component.params.model_fields)
    return {n: getattr(params, n) for n in names}


class Op:
    """A component's functional form bound to a backend choice ("auto" or a backend name)."""

    def __init__(self, component_id: str, backend: str = "auto") -> None:
        self.component = get_registry().component(component_id)
        if backend != "auto":
            get_registry().backend(component_id, backend)  # unknown names fail now, not at call
        self.backend = backend
        self._cache: dict[Any, Backend] = {}

    def resolve(self, *args: Any, **kwargs: Any) -> Backend:
        tensors, params = split_arguments(self.component, args, kwargs)
        return self._resolve(tensors, params)

    def _resolve(self, tensors, params) -> Backend:
        inputs = self.component.describe(**tensors, params=params)
        if inputs not in self._cache:
            self._cache[inputs] = resolve(self.component.id, inputs, self.backend)
        return self._cache[inputs]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        tensors, params = split_arguments(self.component, args, kwargs)
        backend = self._resolve(tensors, params)
        return backend.fn(**tensors, **op_kwargs(self.component, params))

    def __repr__(self) -> str:
        return f"op({self.component.id!r}, backend={self.backend!r})"


def op(component_id: str, backend: str = "auto") -> Op:
    """The functional op of a registered component."""
    return Op(component_id, backend)




class BoundOp:
    """An op with validated params, for modules: dispatch is cached per input signature."""

    def __init__(self, component_id: str, params, backend: str = "auto") -> None:
        self.op = Op(component_id, backend)
        self.params = params
        self.kwargs = op_kwargs(self.op.component, params)

    def resolve_for(self, inputs) -> Backend:
        if inputs not in self.op._cache:
            self.op._cache[inputs] = resolve(self.op.component.id, inputs, self.op.backend)
        return self.op._cache[inputs]

    def __call__(self, *args: Any, **tensors: Any) -> Any:
        names = _tensor_names(self.op.component)
        named = dict(zip(names, args, strict=False))
        named.update(tensors)
        for name in names:
            named.setdefault(name, None)
        backend = self.resolve_for(self.op.component.describe(**named, params=self.params))
        return backend.fn(**named, **self.kwargs)
