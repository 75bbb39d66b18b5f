from elastic_runner.testing.fixtures import elastic_run  # noqa: F401
