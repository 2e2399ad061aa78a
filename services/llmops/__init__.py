"""llmops: a Kubernetes-native LLMOps platform.

Five gRPC services carry a model through its life: training, registry, quantization, serving and
response caching. This package (the folder ``services/``) holds all of them plus the shared runtime in
:mod:`llmops.common`.
"""

__version__ = "0.1.0"
