"""Schedulers that place the agents: what a job step tells elastic-run before Hydra composes.

Under a scheduler, the same ``elastic-run`` command runs once per node and the scheduler's
environment already says how many nodes there are, which one this is, and who the job is.
The top-level key ``scheduler`` (``auto``, ``slurm``, ``none``) chooses whether that is
read; :mod:`elastic_runner.schedulers.slurm` reads a Slurm job step (``srun``, one task per
node) and turns it into the rendezvous the Hydra command line would otherwise have to
spell out. Nothing here runs inside the agent loop: the decision is made once, in the
front door (:mod:`elastic_runner.cli`), as Hydra overrides plus a
:class:`~elastic_runner.config_patch.ConfigPatch`.
"""
