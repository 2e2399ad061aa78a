"""The response cache: exact answers to deterministic generation requests, kept in Redis.

``keys`` turns a request into a digest, ``service.ResponseCache`` looks answers up, stores them and
runs single flight (failing open), ``backends`` hold them (Redis, and a fake for tests), and
``grpc_app`` / ``app`` host the ``llmops.cache.v1.CacheService``.
"""
