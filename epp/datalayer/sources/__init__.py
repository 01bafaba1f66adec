"""Data sources (one file a plugin type)."""
