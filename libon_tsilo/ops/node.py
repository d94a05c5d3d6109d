"""Which node this process is: the id that ``ts.dump``, ``ul.dump``, ``stats`` and ``/metrics`` carry.

A single server has no node id (""). In a cluster every process is a node and needs an id that is
unique and stable across restarts (bindings in Redis name the node that holds their flow): either
``[cluster] node_id``, or, when that is empty, ``<hostname>-<port>`` where the port is one this
worker owns alone on its host: its internal address (``[cluster] node_address``), else its admin
API's, else its SIP port unless the workers share it through SO_REUSEPORT.
"""

from __future__ import annotations

import re
import socket

from twisted.logger import Logger

from libon_tsilo.ops.config import Config, ConfigError
from libon_tsilo.sip.listen import parse_listen_spec

__all__ = ["clustered", "resolve_node_id"]

log = Logger()


def clustered(cfg: Config) -> bool:
    """True when this process is one of several nodes (so it needs a node id)."""
    cluster = cfg.cluster
    return cluster.reuse_port or bool(cluster.node_address) or cfg.location.backend == "redis"


def _endpoint_port(endpoint: str) -> int:
    """The port of a twisted server endpoint ("tcp:8081:interface=..."); 0 for none (unix socket)."""
    kind, _, rest = endpoint.partition(":")
    text = rest.split(":", 1)[0].removeprefix("port=")
    return int(text) if kind in ("tcp", "tcp6", "ssl") and text.isdigit() else 0


def _own_port(cfg: Config) -> int | None:
    """A port no other node of this host binds: the internal address's (the Path relay), else the
    admin API's (one per worker), else, when workers do not share it, the first SIP listener's."""
    cluster = cfg.cluster
    candidates = [parse_listen_spec(cluster.node_address).port if cluster.node_address else 0,
                  _endpoint_port(cfg.admin.listen)]
    if not cluster.reuse_port:
        candidates += [parse_listen_spec(s).port for s in cfg.sip.listen]
    return next((port for port in candidates if port), None)


def resolve_node_id(cfg: Config, hostname: str | None = None) -> str:
    """``[cluster] node_id``, else "" for a single node, else ``<hostname>-<port>`` (logged).

    Raises ConfigError (naming ``cluster.node_id``) when a clustered worker has no port of its own
    to derive an id from: two workers would then answer with the same id.
    """
    if cfg.cluster.node_id or not clustered(cfg):
        return cfg.cluster.node_id
    port = _own_port(cfg)
    if port is None:
        problem = "required: this worker shares its SIP port and has no node_address or admin port"
        raise ConfigError("cluster.node_id", problem)
    name = hostname if hostname is not None else socket.gethostname()
    host = re.sub(r"[^A-Za-z0-9_-]", "-", name.split(".", 1)[0])[:56].strip("-_") or "node"
    node_id = f"{host}-{port}"
    log.info("cluster: node id {node} (derived; set [cluster] node_id to choose it)", node=node_id)
    return node_id
