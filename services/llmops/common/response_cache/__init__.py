"""The response cache library: exact answers to deterministic generation requests, kept in Redis.

Shared by the cache service (which hosts it as ``llmops.cache.v1.CacheService``) and serving (which
uses it in process, straight to Redis), so neither imports the other. ``keys`` turns a request into
a digest, ``cache.ResponseCache`` looks answers up, stores them and runs single flight (failing
open), ``backends`` hold them (Redis, and a fake for tests), ``codec`` reads and writes the stored
payload, and ``build`` makes one from the settings.
"""
