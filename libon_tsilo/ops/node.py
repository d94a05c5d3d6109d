"""Which node this process is: the id that ``ts.dump``, ``ul.dump``, ``stats`` and ``/metrics`` carry.

A single server has no node id (""). In a cluster every process is a node and needs an id that is
unique and stable across restarts (bindings in Redis name the node that holds their flow): either
``[cluster] node_id``, or, when that is empty, ``<hostname>-<port>`` where the port is one this
worker owns alone on its host (workers that share the public SIP port through SO_REUSEPORT are
told apart by their admin port).
"""

from __future__ import annotations

import re
import socket

from twisted.logger import Logger

from libon_tsilo.ops.config import Config, ConfigError

__all__ = ["clustered", "resolve_node_id"]

log = Logger()


def clustered(cfg: Config) -> bool:
    """True when this process is one of several nodes (so it needs a node id)."""
    return cfg.cluster.reuse_port or cfg.location.backend == "redis"


def _own_port(cfg: Config) -> int | None:
    """A port no other node of this host binds: the admin API's (one per worker), else, when the
    workers do not share the public port, the first SIP listener's."""
    kind, _, rest = cfg.admin.listen.partition(":")
    port = rest.split(":", 1)[0].removeprefix("port=")
    if kind in ("tcp", "tcp6", "ssl") and port.isdigit() and int(port):
        return int(port)
    if not cfg.cluster.reuse_port:
        sip = [a.port for a in cfg.sip.listen_addresses if a.port]
        return sip[0] if sip else None
    return None


def resolve_node_id(cfg: Config, hostname: str | None = None) -> str:
    """``[cluster] node_id``, else "" for a single node, else ``<hostname>-<port>`` (logged).

    Raises ConfigError (naming ``cluster.node_id``) when a clustered worker has no port of its own
    to derive an id from: two workers would then answer with the same id.
    """
    if cfg.cluster.node_id or not clustered(cfg):
        return cfg.cluster.node_id
    port = _own_port(cfg)
    if port is None:
        raise ConfigError(
            "cluster.node_id", "required in a cluster unless [admin] listen gives this worker its own port"
        )
    name = hostname if hostname is not None else socket.gethostname()
    host = re.sub(r"[^A-Za-z0-9_-]", "-", name.split(".", 1)[0])[:56].strip("-_") or "node"
    node_id = f"{host}-{port}"
    log.info("cluster: node id {node} (derived; set [cluster] node_id to choose it)", node=node_id)
    return node_id
