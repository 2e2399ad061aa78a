"""Pipeline stages: each a thin CLI (``python -m stages.<name>`` from ``pipelines/``, or
``python -m pipelines.stages.<name>`` from the repository root) over importable functions.

Stages import each other only relatively, so both spellings load the same code.
"""
