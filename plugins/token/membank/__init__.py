"""``token.membank``: sliding-window attention plus a learned, fixed-size memory bank."""
