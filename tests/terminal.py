"""Processes that receive Ctrl-C as a process started from a terminal does.

A test run started in the background (`cmd &` in a script, nohup) inherits SIGINT ignored, and so does every process
it starts; Python then installs no KeyboardInterrupt handler and a Ctrl-C test cannot reach its subject. The tests
that send SIGINT put it back to its default first.
"""
from __future__ import annotations

import signal


def default_sigint() -> None:
    """A ``preexec_fn``: SIGINT at its default in the child, where Python then installs its own handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
