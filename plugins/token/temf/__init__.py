"""``token.temf``: chunked attention with learned per-chunk summaries ("Temporal Memory Fusion",
our definition; see docs/components/temf.md)."""
