"""TF Serving's Predict, GetModelMetadata and GetModelStatus over the models ``modelseal serve`` loaded,
independent of transport: :mod:`.grpc_api` and :mod:`.rest` decode requests, call these, and encode
what they return. Status and metadata are built once, as the JSON TF Serving's REST API answers (which is
also protobuf's JSON mapping of the gRPC messages), so both transports say the same thing.

Every model is served under one signature: a SavedModel's (config ``parameters { key: "signature" }``,
``serving_default`` by default), ``serving_default`` for the others. Errors carry TF Serving's codes and,
where a client might match on them, its messages: an unknown model is NOT_FOUND ``Servable not found for
request: Latest(name)``, an unknown signature FAILED_PRECONDITION, a wrong input INVALID_ARGUMENT. Over
REST they become the HTTP statuses TF Serving's ``ToHTTPStatusCode`` gives (FAILED_PRECONDITION is 400).
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from modelseal.errors import UsageError
from modelseal.serve.errors import ServeError
from modelseal.serve.models import LoadedModel
from modelseal.serve.repository import ModelSpec, version_number
from modelseal.serve.tfserving.tensors import tf_dtype

DEFAULT_SIGNATURE = "serving_default"
PREDICT_METHOD = "tensorflow/serving/predict"
SIGNATURE_DEF_TYPE = "type.googleapis.com/tensorflow.serving.SignatureDefMap"
MAX_SHOWN_NAME, MAX_SHOWN_NAMES = 100, 10  # of the input names an error message lists
# TF Serving's gRPC code -> HTTP status (model_servers/http_server.cc)
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "NOT_FOUND": 404,
               "RESOURCE_EXHAUSTED": 429, "UNIMPLEMENTED": 501, "INTERNAL": 500, "UNAVAILABLE": 503,
               "DEADLINE_EXCEEDED": 504, "UNKNOWN": 500}  # fmt: skip


class TFServingError(ServeError):
    """A refusal with TF Serving's gRPC ``code`` and the HTTP status TF Serving gives that code."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(status or HTTP_STATUS[code], message)
        self.code = code

    @property
    def grpc_code(self) -> str:
        return self.code


def as_tfserving(exc: ServeError) -> TFServingError:
    """A server error in TF Serving's terms, keeping its HTTP status (a body over the size limit stays
    413, not the 429 of RESOURCE_EXHAUSTED, which tells clients to retry) and when to retry."""
    if isinstance(exc, TFServingError):
        return exc
    converted = TFServingError(exc.grpc_code, str(exc), exc.status)
    converted.retry_after = exc.retry_after
    return converted


def signature_of(spec: ModelSpec) -> str:
    if spec.platform == "tensorflow_savedmodel":
        return spec.parameters.get("signature", DEFAULT_SIGNATURE)
    return DEFAULT_SIGNATURE


def refuse_label(label: str) -> None:
    """Version labels are not served (no config assigns any): a request naming one is refused."""
    if label:
        raise TFServingError("INVALID_ARGUMENT", f"Unrecognized servable version label: {label[:100]}")


def lookup(srv: Any, name: str, version: int | None, label: str = "") -> LoadedModel:
    """The model a request's ``model_spec`` names (``version`` None: the newest loaded)."""
    refuse_label(label)
    try:
        return srv.models.get(name, "" if version is None else str(version))  # type: ignore[no-any-return]
    except ServeError as exc:
        if exc.status != 404:
            raise as_tfserving(exc) from None
        wanted = f"Latest({name[:200]})" if version is None else f"Specific({name[:200]}, {version})"
        raise TFServingError("NOT_FOUND", f"Servable not found for request: {wanted}") from None


def check_signature(model: LoadedModel, signature: str) -> str:
    """The signature a request names ("" is ``serving_default``), refused unless it is the model's."""
    wanted = signature or DEFAULT_SIGNATURE
    if wanted != signature_of(model.spec):
        raise TFServingError("FAILED_PRECONDITION", f'Serving signature key "{wanted[:200]}" not found.')
    return wanted


def _listed(names: list[str]) -> str:
    """``{a,b,...}`` as TF Serving writes name sets, bounded: names a client chose may be megabytes long
    and a request may hold a million of them (the message would outgrow gRPC's metadata limit)."""
    shown = [n if len(n) <= MAX_SHOWN_NAME else f"{n[:MAX_SHOWN_NAME]}..." for n in names[:MAX_SHOWN_NAMES]]
    more = f",...({len(names) - MAX_SHOWN_NAMES} more)" if len(names) > MAX_SHOWN_NAMES else ""
    return "{" + ",".join(shown) + more + "}"


def check_input_names(model: LoadedModel, names: list[str]) -> None:
    """TF Serving's check: exactly the signature's inputs, in its words."""
    declared = sorted(t.name for t in model.spec.inputs)
    if sorted(names) != declared:
        extra = sorted(set(names) - set(declared))
        missing = sorted(set(declared) - set(names))
        raise TFServingError(
            "INVALID_ARGUMENT",
            f"input size does not match signature: {len(names)}!={len(declared)} len({_listed(sorted(names))}) "
            f"!= len({_listed(declared)}). Sent extra: {_listed(extra)}. Missing but required: {_listed(missing)}.",
        )


def check_outputs(model: LoadedModel, output_filter: list[str]) -> list[str]:
    """The outputs to compute: ``output_filter`` checked (every output when it is empty)."""
    declared = [t.name for t in model.spec.outputs]
    if not output_filter:
        return declared
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in declared:
            raise TFServingError("INVALID_ARGUMENT", f"output tensor alias not found in signature: {alias[:200]} "
                                 f"Outputs expected to be in the set {{{','.join(sorted(declared))}}}.")  # fmt: skip
        if alias in seen:
            raise TFServingError("INVALID_ARGUMENT", f"duplicate output tensor alias: {alias[:200]}")
        seen.add(alias)
    return output_filter


async def predict(
    srv: Any, model: LoadedModel, inputs: dict[str, np.ndarray], outputs: list[str], client: str
) -> dict[str, Any]:
    """Run the model for ``client`` (who rate limits count: :func:`~modelseal.serve.metering.rate_client`);
    the outputs asked for, in that order."""
    try:
        results = await srv.models.infer(model, inputs, outputs, client=client)
    except ServeError as exc:
        raise as_tfserving(exc) from None
    return {name: results[name] for name in outputs}


def model_spec(model: LoadedModel, signature: str = "") -> dict[str, Any]:
    spec = {"name": model.spec.name, "version": str(model.version)}
    return {**spec, "signature_name": signature} if signature else spec


def _tensor_info(name: str, datatype: str, shape: list[int]) -> dict[str, Any]:
    dims = [{"size": str(d), "name": ""} for d in shape]
    return {"dtype": tf_dtype(datatype), "tensor_shape": {"dim": dims, "unknown_rank": False}, "name": name}


def signature_def_map(model: LoadedModel) -> dict[str, Any]:
    """The model's ``SignatureDefMap`` (JSON mapping): its one signature, inputs and outputs with their
    TensorFlow types and shapes (-1: the batch dimension, or a variable one)."""
    spec = model.spec
    info = {
        side: {t.name: _tensor_info(t.name, meta["datatype"], meta["shape"])
               for t in tensors for meta in [t.metadata(spec.batching)]}
        for side, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs))
    }  # fmt: skip
    return {"signature_def": {signature_of(spec): {**info, "method_name": PREDICT_METHOD}}}


def metadata(model: LoadedModel, fields: list[str]) -> dict[str, Any]:
    """``GetModelMetadataResponse`` (JSON mapping, the SignatureDefMap unpacked as REST answers it)."""
    if not fields:
        raise TFServingError("INVALID_ARGUMENT", "GetModelMetadataRequest must specify at least one metadata_field")
    for field in fields:
        if field != "signature_def":
            raise TFServingError("INVALID_ARGUMENT", f"Metadata field {field[:100]} is not supported")
    return {"model_spec": model_spec(model), "metadata": {"signature_def": signature_def_map(model)}}


def _status(version: int, state: str, code: str = "OK", message: str = "") -> dict[str, Any]:
    return {"version": str(version), "state": state, "status": {"error_code": code, "error_message": message}}


def model_status(srv: Any, name: str, version: int | None, versions_on_disk: list[int] | None) -> dict[str, Any]:
    """``GetModelStatusResponse`` (JSON mapping): each loaded version AVAILABLE; a model loading, LOADING;
    one that could not be loaded or was unloaded (its key revoked, say), END with the reason as an
    UNAVAILABLE status. ``versions_on_disk``: the version directories its policy serves (for a model
    with none loaded), None when the repository has no such model."""
    manager = srv.models
    loaded = manager.models.get(name, {})
    if not loaded and versions_on_disk is None:
        raise TFServingError("NOT_FOUND", f"Could not find any versions of model {name[:200]}")
    state = manager.states.get(name)
    rows = [_status(v, "AVAILABLE") for v in sorted(loaded)]
    for v in (versions_on_disk or []) if not loaded else []:
        if state is not None and state.state == "LOADING":
            rows.append(_status(v, "LOADING"))
        else:
            reason = state.reason if state is not None and state.reason else "not loaded"
            rows.append(_status(v, "END", "UNAVAILABLE", reason))
    if version is not None:
        rows = [r for r in rows if r["version"] == str(version)]
        if not rows:
            raise TFServingError("NOT_FOUND", f"Could not find version {version} of model {name[:200]}")
    elif not rows:
        raise TFServingError("NOT_FOUND", f"Could not find any versions of model {name[:200]}")
    return {"model_version_status": rows}


async def status(srv: Any, name: str, version: int | None) -> dict[str, Any]:
    """:func:`model_status`, reading the repository (for a model with none loaded) off the loop, once."""

    def on_disk() -> list[int] | None:
        if srv.models.models.get(name):
            return []
        if name not in srv.models.repository.names():
            return None
        try:
            return srv.models.repository.spec(name).versions()  # type: ignore[no-any-return]
        except (UsageError, OSError):  # a broken config: the model's state says why it is not loaded
            return []

    return model_status(srv, name, version, await asyncio.to_thread(on_disk))


def parse_version(text: str) -> int:
    number = version_number(text)
    if number is None:
        raise TFServingError("INVALID_ARGUMENT", f"version {text[:40]!r} is not a number")
    return number
