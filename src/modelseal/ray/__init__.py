"""Serve a sealed model with Ray Serve: every replica opens it itself, with the key from its node's agent.

::

    from ray import serve
    import modelseal.ray

    serve.start(http_options={"host": "127.0.0.1", "port": 8000})
    serve.run(modelseal.ray.deployment("/models/resnet50/model.onnx.sealed", name="resnet50",
                                       identity="agent:/run/modelseal/agent.sock", num_replicas=2),
              route_prefix="/")
    # POST http://127.0.0.1:8000/v2/models/resnet50/infer: the KServe V2 request modelseal serve takes

Ray moves a deployment's init arguments through its controller (which keeps them in the cluster's GCS) and
puts large values in its object store, which spills to local disk. So only *where* the model and its key
come from crosses Ray: a path and an identity reference (``agent:SOCKET``, ``env:VAR`` or a key file
path; key text is refused), as strings and numbers. Each replica, in its own process, makes itself
non-dumpable, opens the sealed file the way ``modelseal serve`` does, gets the key from its node's agent,
builds serve's runtime (:class:`modelseal.triton.sealed.SealedModel`: the loader and key watch Triton and
PyTriton use), and answers V2 requests with serve's own decoding, validation and encoding
(:mod:`modelseal.serve.infer`), so statuses and messages are ``modelseal serve``'s. When the agent refuses
the key (revoked, expired), each replica's watch wipes its model within ``key_check_s`` and every request
gets 503 with the reason; every ``retry_s`` the replica tries to load it again, so a re-grant brings it
back. A replica added by ``num_replicas`` or autoscaling asks its agent, never Ray.

* :mod:`.args`: the replica's arguments, checked in the driver and again in each replica;
* :mod:`.replica`: ``SealedReplica``, the deployment's class (load, key watch, retry, ``status()``);
* :mod:`.endpoint`: the V2 REST routes, framework-independent (also usable without Ray).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from modelseal.errors import MissingDependencyError, UsageError
from modelseal.ray.args import check_options, replica_args
from modelseal.ray.endpoint import REPLICA_HEADER, Endpoint
from modelseal.ray.replica import SealedReplica, load_model

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = ["REPLICA_HEADER", "Endpoint", "SealedReplica", "build_app", "deployment", "load_model", "replica_args"]


def deployment(
    sealed: str | os.PathLike[str], *, name: str, identity: str | None = None, **options: Any
) -> Application:
    """A Ray Serve application (``serve.run`` it) serving the sealed model ``sealed`` as ``name`` on every
    replica. Keyword arguments of :func:`replica_args` (``platform``, ``max_batch_size``, ``inputs``,
    ``outputs``, ``key_check_s``, ``grace_s``, ``retry_s``, ``threads``, ``trusted_signers``, ``entry_point``,
    ``max_body_bytes``) configure the model; every other one is a ``serve.deployment`` option
    (``num_replicas``, ``autoscaling_config``, ``ray_actor_options``, ``max_ongoing_requests``...).
    ``identity``: ``agent:SOCKET`` (the node's agent: the key watch then runs), ``env:VAR`` or a key file
    path on every node; default ``$MODELSEAL_IDENTITY``, then ``$MODELSEAL_AGENT_SOCKET`` in the replica."""
    own = set(replica_args.__kwdefaults__ or {}) - {"name", "identity"}
    args = replica_args(sealed, name=name, identity=identity, **{k: options.pop(k) for k in own & set(options)})
    check_options(options)
    try:
        from ray import serve
    except ImportError:
        raise MissingDependencyError("modelseal.ray needs Ray Serve: pip install 'modelseal[ray]'") from None
    return serve.deployment(name=name, **options)(SealedReplica).bind(**args)


NUMBERS = {"max_batch_size": int, "threads": int, "max_body_bytes": int, "key_check_s": float, "grace_s": float,
           "retry_s": float}  # fmt: skip
LISTS = ("inputs", "outputs", "trusted_signers")


def build_app(args: Mapping[str, Any]) -> Application:
    """Ray Serve's *application builder*, for config files (``import_path: modelseal.ray:build_app``, the
    model's settings under ``args``, ``num_replicas`` and the like under ``deployments``, the deployment
    named as the model) and ``serve run modelseal.ray:build_app sealed=PATH name=NAME identity=...``.
    Values given as text (the command line) are converted; a list given as text is space-separated."""
    known = {"sealed", "name", "identity", *(replica_args.__kwdefaults__ or {})}
    unknown = sorted(str(k)[:40] for k in args if k not in known)
    if unknown:
        raise UsageError(f"modelseal.ray: unknown argument(s) {unknown}; known: {sorted(known)}")
    if not args.get("sealed") or not args.get("name"):
        raise UsageError("modelseal.ray: the application needs 'sealed' (the model's path) and 'name'")
    values = dict(args)
    for key, kind in NUMBERS.items():
        if isinstance(values.get(key), str):
            try:
                values[key] = kind(values[key])
            except ValueError:
                raise UsageError(f"modelseal.ray: {key} must be a number, not {values[key][:40]!r}") from None
    for key in LISTS:
        if isinstance(values.get(key), str):
            values[key] = values[key].split()
    return deployment(values.pop("sealed"), **values)
