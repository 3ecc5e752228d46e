"""Sealed models inside a real Triton Inference Server, through its Python backend (docs/serving.md,
"Inside Triton").

Triton has no encryption, and its repository agents can only hand it a plaintext directory. Here the
sealed file stays sealed on disk: the Python-backend model (:mod:`.model`) decrypts it in the backend's
stub process at ``initialize``, with the same code ``modelseal serve`` uses (:mod:`modelseal.serve.source`
and the runtimes of :mod:`modelseal.serve.runtimes`), runs the batches Triton hands it, watches the key's
lease with :class:`~modelseal.load.leasewatch.LeaseWatch`, and wipes the model at ``finalize``.

* :mod:`.settings`: the model's ``parameters`` in config.pbtxt, and Triton's config as a ``ModelSpec``;
* :mod:`.sealed`: a loaded sealed model, framework-agnostic (also used by :mod:`modelseal.pytriton`);
* :mod:`.model`: ``TritonPythonModel``, the file a repository's ``model.py`` re-exports (or is a copy of);
* :mod:`.layout`: ``modelseal triton-repo``, a repository laid out from sealed models.
"""
