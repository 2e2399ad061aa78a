"""The model registry service: versions, aliases, lineage and verified artifacts on MLflow."""
