"""Shared runtime used by every llmops service."""
