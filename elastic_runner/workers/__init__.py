"""Worker processes: the launcher interface (:mod:`~elastic_runner.workers.launcher`),
the environment contract, spawning and supervision, containment, logs. Import the
submodules themselves: this package imports nothing, so the agent loop loads only the
interfaces it uses."""
