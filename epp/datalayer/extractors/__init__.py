"""Data extractors (one file a plugin type)."""
