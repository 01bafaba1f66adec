"""Data producers: plugins that compute per-request data before scheduling (see README.md)."""
