"""A JetStream cluster of nats-servers on loopback, from the same wheel as `EmbeddedNats`:
the shape of a deployment's 3-node cluster (infra/deploy/nats/) on one machine, for
developing and for tests that kill a node under load.

Each node is an `EmbeddedNats` of its own (its store, log and PID file in `root/node-<n>`)
named kiln-1 … kiln-N, with a client, a cluster and a monitoring port. Clients are given
every node's URL (`url`, comma-separated), so a connection moves to another node when its
own dies.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import httpx

from infra.embedded import EmbeddedNats, ServerError, free_port

CLUSTER_CONFIG = """\
http: 127.0.0.1:{http}  # /healthz and /jsz: is the node current, who leads
cluster {{
  name: kiln
  listen: 127.0.0.1:{cluster}
  # Every node lists all of them (its own route is ignored): any majority forms the quorum.
  routes: [{routes}]
}}
"""

READY_S = 60  # a cluster forms and elects its meta leader in seconds; a loaded CPU is slower
POLL_S = 0.2


class NodePorts(NamedTuple):
    client: int
    cluster: int
    http: int

    @classmethod
    def counting_from(cls, base: int, size: int) -> list[NodePorts]:
        """Fixed ports for `kiln up`: clients on base, base+1 …, routes 10 above, monitoring 20."""
        return [cls(base + n, base + 10 + n, base + 20 + n) for n in range(size)]

    @classmethod
    def free(cls, size: int) -> list[NodePorts]:
        """Free ports, for a throwaway cluster (a test)."""
        return [cls(free_port(), free_port(), free_port()) for _ in range(size)]


class EmbeddedNatsCluster:
    def __init__(self, root: Path, ports: list[NodePorts], auth: str = "") -> None:
        """`root`: the data folder's nats folder; `auth` as for `EmbeddedNats`, the same on
        every node (they trust the same operator)."""
        routes = ", ".join(f"nats-route://127.0.0.1:{p.cluster}" for p in ports)
        self.ports = ports
        self.nodes = [
            EmbeddedNats(
                root / f"node-{n}",
                p.client,
                auth,
                name=f"kiln-{n}",
                extra=CLUSTER_CONFIG.format(http=p.http, cluster=p.cluster, routes=routes),
            )
            for n, p in enumerate(ports, start=1)
        ]

    @property
    def url(self) -> str:
        """Every node's client URL: nats-py picks one and moves on when it goes."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> str:
        for node in self.nodes:
            node.start()
        self.wait_ready()
        return self.url

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def kill(self, n: int) -> None:
        """SIGKILL node `n` (1-based): a crash, nothing flushed or said to the others."""
        process = self.nodes[n - 1].process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def restart(self, n: int, timeout_s: float = READY_S) -> None:
        """Start node `n` again on its store, and wait until it has caught up."""
        self.nodes[n - 1].start()
        self.wait_current(n, timeout_s)

    def alive(self, n: int) -> bool:
        process = self.nodes[n - 1].process
        return process is not None and process.poll() is None

    def wait_ready(self, timeout_s: float = READY_S) -> None:
        """Until every live node is current: in the cluster, a meta leader known, and its
        copies of the streams and consumers caught up (`/healthz`)."""
        for n in range(1, len(self.nodes) + 1):
            if self.alive(n):
                self.wait_current(n, timeout_s)

    def wait_current(self, n: int, timeout_s: float = READY_S) -> None:
        deadline = time.monotonic() + timeout_s
        while not (self._healthy(n) and self.meta_leader(n)):
            if time.monotonic() > deadline:
                raise ServerError(
                    f"NATS node kiln-{n} not current in the cluster after {timeout_s:.0f}s; see {self.nodes[n - 1].log}"
                )
            time.sleep(POLL_S)

    def meta_leader(self, n: int | None = None) -> str | None:
        """The server name of the cluster's meta leader, as node `n` (else any live node) sees it."""
        for m in [n] if n else range(1, len(self.nodes) + 1):
            jsz = self._monitor(m, "/jsz")
            leader = (jsz or {}).get("meta_cluster", {}).get("leader")
            if leader:
                return leader
        return None

    def clients(self, n: int) -> list[str]:
        """The names of the connections node `n` serves (`kiln-quota`, …)."""
        connz = self._monitor(n, "/connz?limit=1024") or {}
        return sorted(conn.get("name", "?") for conn in connz.get("connections", []))

    def node_named(self, server_name: str) -> int:
        """The node number of server `kiln-<n>`."""
        return next(n for n, node in enumerate(self.nodes, start=1) if node.name == server_name)

    def _healthy(self, n: int) -> bool:
        return self._monitor(n, "/healthz") is not None

    def _monitor(self, n: int, path: str) -> dict | None:
        """A monitoring endpoint's JSON, or None if the node is down or says it is not healthy."""
        try:
            response = httpx.get(f"http://127.0.0.1:{self.ports[n - 1].http}{path}", timeout=2)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None
