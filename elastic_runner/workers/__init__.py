"""Worker processes: the environment contract, spawning and supervision, logs."""

from elastic_runner.workers.environment import worker_environment
from elastic_runner.workers.logs import WorkerLogPaths
from elastic_runner.workers.supervisor import ProcessSupervisor, WorkerLaunch

__all__ = ["ProcessSupervisor", "WorkerLaunch", "WorkerLogPaths", "worker_environment"]
