"""The cache service: the response cache (:mod:`llmops.common.response_cache`) hosted as
``llmops.cache.v1.CacheService`` (``grpc_app`` / ``app``), and the Redis server the stack and the
tests start (``redis_server``).
"""
