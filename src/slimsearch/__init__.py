"""slimsearch: per-layer compression search for Transformer language models."""
