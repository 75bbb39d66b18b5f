"""A test plugin whose import fails, as a plugin with a missing dependency does."""

raise ImportError("No module named 'missing_dependency_of_the_broken_plugin'")
