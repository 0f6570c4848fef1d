"""Built-in components, one folder per family, registered through the same hooks a third-party
package uses (see ``registry/hookspecs.py``)."""
