"""Kernel servers on a Ray cluster (or local processes), found through a directory.

``python -m kernel_server.cluster up CONFIG.yaml`` (or ``Cluster.up(config)``) starts one
ordinary kernel server per model replica and a directory that clients ask first
(``dj.connect("cluster://host:port")``). See ``docs/cluster.md``.
"""
from .config import ClusterConfig, ModelSpec, from_dict, load
from .deploy import Cluster

__all__ = ["Cluster", "ClusterConfig", "ModelSpec", "from_dict", "load"]
