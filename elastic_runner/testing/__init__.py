"""Test kits that backends (built-in and third-party) reuse: subclass a suite and provide
the fixture it names. See :mod:`elastic_runner.testing.store_suite`."""
