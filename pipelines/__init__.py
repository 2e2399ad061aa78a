"""The DVC pipeline of the demo: data stages in :mod:`pipelines.stages` (see ``README.md``)."""
