"""A plugin that registers a component id a built-in already uses."""

from pydantic import BaseModel, ConfigDict

from blockzoo.registry import Backend, Component, Inputs, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def describe(q, k, v, params=None):
    return Inputs.from_tensors({"q": q, "k": k, "v": v})


@hookimpl
def blockzoo_register_components(registry):
    registry.add_component(Component(id="attention.dense", slot="mixer", params=Params, describe=describe))


@hookimpl
def blockzoo_register_backends(registry):
    # would replace nothing: attention.dense already has a reference backend, so this fails too
    registry.add_backend(Backend("attention.dense", "reference", lambda q, k, v: q))
