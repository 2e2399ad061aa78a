"""Load tests of the llmops gRPC services with Locust: users, load shapes, thresholds and plots.

``loadtests/locustfile.py`` is what Locust runs; ``python -m loadtests.run`` (``make loadtest``) runs
it headless against the local stack or given addresses and writes CSV, HTML and plots into one
folder; ``python -m loadtests.plots`` draws the Prometheus side of a finished run. See README.md.
"""
