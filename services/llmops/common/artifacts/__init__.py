"""A model's files between services: their manifest, their transfer to and from the registry, and
where a job reads its model from and writes its result to.

Shared by the registry (its side of the transfer), training and quantization (``sources`` and
``sinks``) and serving (downloads), so none of them imports another: ``manifest`` lists and checks a
folder, ``transfer`` streams chunks, ``client`` uploads and downloads through a registry client,
``sources`` resolve a job's input model and ``sinks`` register its result.
"""
