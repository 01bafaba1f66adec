"""Building a `kubernetes` ApiClient: an explicit kubeconfig, in-cluster config, or KUBECONFIG."""

from __future__ import annotations

import logging
import os

from kubernetes import client, config

log = logging.getLogger("epp.sources.kube_client")

# One connection per watch thread (pool, pods, 2 x models, rewrites, objectives) plus status
# patches and the lease; the client's default (5 x CPUs) can be 10 on a small node.
POOL_SIZE = 32


def make_api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """An ApiClient of its own (the library's global default configuration is left alone).

    Order: `kubeconfig` when given; in-cluster service account when running in a pod
    (KUBERNETES_SERVICE_HOST set); otherwise KUBECONFIG / ~/.kube/config.
    """
    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        source = f"kubeconfig {kubeconfig}"
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)
        source = "in-cluster service account"
    else:
        config.load_kube_config(client_configuration=cfg, persist_config=False)
        source = "KUBECONFIG" if os.environ.get("KUBECONFIG") else "~/.kube/config"
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, POOL_SIZE)
    log.info("kubernetes client configured", extra={"source": source, "host": cfg.host})
    return client.ApiClient(configuration=cfg)
