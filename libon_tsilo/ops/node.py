"""Which node this process is: the id that ``ts.dump``, ``ul.dump``, ``stats`` and ``/metrics`` carry.

A single server has no node id (""). In a cluster every process is a node and needs an id that is
unique and stable across restarts (bindings in Redis name the node that holds their flow): either
``[cluster] node_id``, or, when that is empty, ``<hostname>-<port>`` where the port is the one
this worker owns alone (workers of one host share the public SIP port through SO_REUSEPORT, so it
cannot tell them apart).
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
    return cfg.cluster.reuse_port


def _own_port(cfg: Config) -> int | None:
    """The port no other worker of this host binds: the admin API's (each worker has its own)."""
    listen = cfg.admin.listen
    kind, _, rest = listen.partition(":")
    if not listen or kind == "unix":
        return None
    port = rest.split(":", 1)[0].removeprefix("port=")
    return int(port) if port.isdigit() and int(port) else None


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
