"""A free TCP port for a test's torch.distributed rendezvous. The suite runs its test files on several workers at once
(pytest-xdist), so a fixed port, or one derived from the process id, could be taken by another worker's run."""

import socket


def free_port() -> int:
    """A port no process is listening on right now (the OS's choice for port 0 on the loopback interface)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
