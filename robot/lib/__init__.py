"""The parts of ``CleverAgentsLibrary``, one concern each; ``CleverAgentsLibrary.py`` joins them.

- :mod:`lib.common`: what the others share: temporary folders, failing with a message.
- :mod:`lib.command`: the ``cleveragents`` command as a process: run, start, signal,
  wait, and checks of its exit code and output.
- :mod:`lib.plans`: plan files, written from the templates in ``robot/plans/``.
- :mod:`lib.ledger`: databases read through a separate, read-only connection.
- :mod:`lib.workloads`: handlers opened through the Python API in this process, the
  plans run on them, and the descriptors and threads they leave.
"""
