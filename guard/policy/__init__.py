"""Policy format, loading and hot reload."""
