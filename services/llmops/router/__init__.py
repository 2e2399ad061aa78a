"""The router: one front door for the serving fleet (``llmops serve router``).

Usage (engineer D, benchmarks): start serving replicas, then the router with their gRPC addresses::

    llmops serve serving --port 0 --model /path/to/model   # prints: llmops serving listening grpc=PORT ...
    LLMOPS_ROUTER_ENDPOINTS=127.0.0.1:PORT1,127.0.0.1:PORT2 \\
    LLMOPS_ROUTER_POLICY=prefix_affinity \\
        llmops serve router --port 0 --metrics-port 0       # prints: llmops router listening grpc=PORT ...

Clients call the router exactly as a replica (``llmops.serving.v1.ServingService``; ServingClient
works unchanged). Per request, metadata ``x-llmops-route-policy`` (round_robin | least_loaded |
prefix_affinity | session_affinity) overrides the policy and ``x-llmops-session-id`` pins a session
(and implies session_affinity); a bad value is INVALID_ARGUMENT. ``llmops.router.v1.RouterService``
(ListEndpoints, GetStats, GetPolicy) shows replicas, load, decisions (prefix hits, spills, decision
time p50/p99) and per-version traffic. Settings: ``router.*`` in :mod:`llmops.common.settings`
(``LLMOPS_ROUTER_*``).

The OpenAI HTTP API is on ``router.http_port`` (a routing proxy to each replica's own HTTP API).
With ``LLMOPS_REDIS_URL`` set the response cache is looked up before any replica is called; with
``LLMOPS_ROUTER_TRAFFIC_SPLIT=true`` (and ``LLMOPS_REGISTRY_ADDRESS``) the registry's alias weights
split each model's traffic, sticky per session. ``llmops up --serving-replicas 2`` runs the
embedded stack with two replicas behind the router.

Replicas report their load through ``ServingService.WatchLoad`` (see :mod:`llmops.serving.load`).
"""
