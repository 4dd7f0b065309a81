"""Two test hosts for the tests of several machines: network namespaces joined by a bridge (each with
its own address, reaching only the bridge's subnet), or, where namespaces cannot be made (not
root, no `ip`), two loopback addresses on this host. Everything made is removed afterwards."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Host:
    name: str
    address: str
    namespace: str | None  # None: a loopback "host", processes of this machine
    processes: list[subprocess.Popen] = field(default_factory=list)

    def prefix(self) -> list[str]:
        """What runs a command on this host."""
        return ["ip", "netns", "exec", self.namespace] if self.namespace else []

    def start(self, cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            [*self.prefix(), *cmd], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def kill(self) -> list[int]:
        """SIGKILL every process of the host at once, as a power cut would: in a namespace every process
        in it, on loopback every process started here and all their descendants. Returns the PIDs."""
        import psutil

        if self.namespace:
            pids = [int(p) for p in run("ip", "netns", "pids", self.namespace).split()]
        else:
            roots = [psutil.Process(p.pid) for p in self.processes if p.poll() is None]
            pids = [p.pid for root in roots for p in [root, *root.children(recursive=True)]]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes:
            process.wait()
        return pids


@dataclass
class Hosts:
    mode: str  # "network namespaces" or "loopback"
    server_address: str  # where the hosts reach this machine (the bridge's address, or 127.0.0.1)
    hosts: list[Host]


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def namespaces_work() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"cfprobe{os.getpid() % 100000}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True)
    if done.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True


@contextmanager
def two_hosts() -> Iterator[Hosts]:
    """Hosts `a` and `b`; their processes are killed and their namespaces, links and bridge deleted after."""
    if not namespaces_work():
        hosts = Hosts("loopback", "127.0.0.1", [Host("host-a", "127.0.0.2", None), Host("host-b", "127.0.0.3", None)])
        try:
            yield hosts
        finally:
            for host in hosts.hosts:
                host.kill()
        return
    tag = f"{os.getpid() % 10000:04d}"
    subnet = f"10.231.{os.getpid() % 250}"
    bridge = f"cfbr{tag}"
    hosts = Hosts(
        "network namespaces",
        f"{subnet}.1",
        [Host(f"host-{x}", f"{subnet}.{2 + i}", f"cf{x}{tag}") for i, x in enumerate("ab")],
    )
    made: list[list[str]] = []  # undo commands, run in reverse
    try:
        run("ip", "link", "add", bridge, "type", "bridge")
        made.append(["ip", "link", "del", bridge])
        run("ip", "addr", "add", f"{hosts.server_address}/24", "dev", bridge)
        run("ip", "link", "set", bridge, "up")
        for host in hosts.hosts:
            ns, outside = str(host.namespace), f"{host.namespace}o"
            run("ip", "netns", "add", ns)
            made.append(["ip", "netns", "del", ns])
            run("ip", "link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            made.append(["ip", "link", "del", outside])
            run("ip", "link", "set", outside, "master", bridge)
            run("ip", "link", "set", outside, "up")
            run("ip", "-n", ns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            run("ip", "-n", ns, "link", "set", "eth0", "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")  # a new namespace's loopback is down
        yield hosts
    finally:
        for host in hosts.hosts:
            host.kill()
        time.sleep(0.2)
        for undo in reversed(made):
            subprocess.run(undo, capture_output=True)
