"""Version shims: the only place allowed to touch another library's private API."""
