"""A plugin with a hookimpl whose name matches no hookspec (missing the final 's')."""

from blockzoo.registry import hookimpl


@hookimpl
def blockzoo_register_component(registry):
    raise AssertionError("never called: the misspelled hook must be rejected at registration")
