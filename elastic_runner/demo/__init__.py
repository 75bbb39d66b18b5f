"""Stdlib-only demo workers used by the ``+job=hello`` preset."""
