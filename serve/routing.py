"""Tenant affinity for the engine replicas: Ray Serve's model multiplexing, with the tenant as the model.

The ingress calls the engine deployment for a tenant through :func:`for_tenant`, which sets Serve's
``multiplexed_model_id`` to the tenant. Each engine replica reports the tenants whose adapter it
holds (:class:`serve.engine_server.EngineServer` reports a tenant through a ``@serve.multiplexed``
method whose "model" is only the tenant's name, and withdraws it with :func:`withdraw` when its
:class:`~serve.adapters.AdapterRegistry` lets the tenant go). Serve's router (Ray 2.60:
``ray/serve/_private/request_router/pow_2_router.py`` and ``request_router.py``'s ``MultiplexMixin``)
then sends a tenant's request to a replica that reports the tenant; when none does, or those that do
refuse it because they already run ``max_ongoing_requests``, to the replicas reporting the fewest
tenants; after 1-2 s (``RAY_SERVE_MULTIPLEXED_MODEL_ID_MATCHING_TIMEOUT_S``) to any replica. Between
two candidates it takes the one with the shorter queue (power of two choices).

The registry stays the only judge of what a replica holds: the multiplexed method is declared with
``max_num_models_per_replica=-1``, so Ray's own LRU never evicts (and never calls back into the
registry); the registry's idle forgetting and a tenant's HEAD going away are the only ways a tenant
leaves a replica, and both withdraw the report.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# Where ``@serve.multiplexed`` keeps its per-instance wrapper (ray/serve/api.py, ``multiplexed``: a
# plain string given to setattr on the instance, so no name mangling).
MULTIPLEX_WRAPPER_ATTR = "__serve_multiplex_wrapper"


def for_tenant(handle, tenant: str, **options: Any):
    """``handle`` with the tenant as Serve's multiplexed model id (plus other ``options``): the router
    prefers a replica that holds the tenant's adapter."""
    return handle.options(multiplexed_model_id=tenant, **options)


def withdraw(owner: Any, tenant: str) -> bool:
    """Stop reporting ``tenant`` as held by the replica whose deployment instance is ``owner``; True if
    it was reported.

    PRIVATE RAY API. Ray 2.60 lets a replica drop a multiplexed model only through the wrapper's own LRU
    (``ray/serve/multiplex.py``, ``_ModelMultiplexWrapper.load_model`` calling ``unload_model_lru``);
    there is no public call to unload a given id. So this takes the id out of the wrapper's ``models``
    (an OrderedDict of id -> model) and sets ``_push_multiplexed_replica_info``, which the wrapper's
    ``_push_model_ids_info`` task (every ``PUSH_MULTIPLEXED_MODEL_IDS_INTERVAL_S``, 0.1 s) reads to
    push the replica's ids to the controller, exactly as ``unload_model_lru``'s caller does.
    ``tests/serve/test_routing.py`` checks this against the installed Ray and fails if it changes.
    Without it a replica would keep reporting a tenant it forgot: requests would still be routed
    correctly (the replica loads the adapter again), but its count of tenants, which Serve uses to place
    a tenant no replica holds, would grow with every tenant it ever served.
    """
    wrapper = getattr(owner, MULTIPLEX_WRAPPER_ATTR, None)
    if wrapper is None:  # nothing reported yet on this replica (or outside Serve)
        return False
    try:
        models = wrapper.models
        if tenant not in models:
            return False
        del models[tenant]
        wrapper._push_multiplexed_replica_info = True
        wrapper.registered_model_gauge.set(0, tags={"model_id": tenant})
    except AttributeError as error:  # a Ray whose wrapper changed: the report goes stale, routing still works
        logger.warning("cannot withdraw tenant %s from Serve's multiplexed model ids (Ray changed?): %s",
                       tenant, error)
        return False
    return True
