"""The embedded stack: every service and its dependencies as local child processes (``llmops up``)."""
