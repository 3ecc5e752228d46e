"""The Triton Python-backend model that serves a sealed model (docs/serving.md, "Inside Triton").

A repository's ``<model>/<version>/model.py`` is one line, ``from modelseal.triton.model import
TritonPythonModel`` (what ``modelseal triton-repo`` writes), or a copy of this file. The stub process runs
it in the Python environment named by the config's ``EXECUTION_ENV_PATH`` (one with modelseal and the
model's framework installed).

Tensors cross between Triton and numpy by DLPack in both directions: with numpy 2 in the environment,
``pb_utils.Tensor.as_numpy()`` (built against numpy 1) returns wrong data without an error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.dont_write_bytecode = True  # the stub would leave __pycache__ beside every module it imports from here on

import numpy as np  # noqa: E402

from modelseal.errors import ModelsealError, UsageError, one_line  # noqa: E402
from modelseal.memory.locked import harden_process  # noqa: E402
from modelseal.triton.sealed import SealedModel, Tensors, client_message, version_of  # noqa: E402
from modelseal.triton.settings import model_spec, parameters, parse_settings  # noqa: E402

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's stub (documentation, type checks): nothing here can run
    pb_utils = None


_default_unraisable = sys.unraisablehook


def _quiet_used_capsules(unraisable: Any) -> None:
    """Drop one known, harmless report: the Python backend renames each DLPack capsule it consumes
    (``used_dlpack``), which numpy's capsule destructor does not recognise, so every output tensor logged a
    ``PyCapsule_GetPointer called with incorrect name`` traceback (values are right). Others pass on."""
    exc = unraisable.exc_value
    if isinstance(exc, ValueError) and "PyCapsule_GetPointer called with incorrect name" in str(exc):
        return
    _default_unraisable(unraisable)


sys.unraisablehook = _quiet_used_capsules


class TritonPythonModel:
    """Triton's Python-backend interface; see the module docstring."""

    model: SealedModel | None = None

    def initialize(self, args: dict[str, Any]) -> None:
        """Decrypt and load the sealed model in memory; any failure leaves the model UNAVAILABLE, with a
        one-line reason Triton reports to clients (``load_model``) and in its log."""
        config = json.loads(args["model_config"])
        harden_process()  # decrypted weights will live in this stub process: no core dumps, no ptrace by others
        try:
            settings = parse_settings(parameters(config))
            version = version_of(args["model_version"])
            spec = model_spec(config, Path(args["model_repository"]), version, settings)
            self.model = SealedModel.load(spec, spec.artifact(version), settings)
        except ModelsealError as exc:
            raise pb_utils.TritonModelException(f"modelseal: {exc}") from None
        except Exception as exc:  # a framework refusing the model: its type and first line, no traceback
            raise pb_utils.TritonModelException(f"modelseal: the runtime refused the model: {one_line(exc)}") from None

    def execute(self, requests: list[Any]) -> list[Any]:
        """Run the requests Triton batched together; each gets its outputs or its own error response
        (after revocation: the reason the model no longer serves)."""
        assert self.model is not None
        model = self.model
        results: list[Tensors | Exception] = [UsageError("not run")] * len(requests)
        batch: list[tuple[Tensors, list[str]]] = []
        taken: list[int] = []  # which requests the batch holds (one that cannot be read gets its own error)
        for i, request in enumerate(requests):
            try:
                batch.append((self._inputs(request), list(request.requested_output_names())
                              or [t.name for t in model.spec.outputs]))  # fmt: skip
                taken.append(i)
            except Exception as exc:
                results[i] = exc
        for i, result in zip(taken, model.run_batch(batch), strict=True):
            results[i] = result
        return [self._response(result) for result in results]

    def _inputs(self, request: Any) -> Tensors:
        assert self.model is not None
        inputs = {}
        for t in self.model.spec.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, t.name)
            if tensor is None:
                raise UsageError(f"the request has no input {t.name!r}")
            inputs[t.name] = np.from_dlpack(tensor)
        return inputs

    def _response(self, result: Tensors | Exception) -> Any:
        """The response for one request: its outputs, or its error (UNAVAILABLE after revocation)."""
        assert self.model is not None
        try:
            if isinstance(result, Exception):
                raise result
            tensors = [pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(a)) for n, a in result.items()]
            return pb_utils.InferenceResponse(output_tensors=tensors)
        except Exception as exc:
            code = pb_utils.TritonError.UNAVAILABLE if self.model.refusal else pb_utils.TritonError.INTERNAL
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(client_message(exc), code))

    def finalize(self) -> None:
        """Unload: stop the key watch, free the model and wipe what modelseal holds of it."""
        if self.model is not None:
            self.model.close()
            self.model = None
