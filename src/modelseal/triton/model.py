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

from modelseal.errors import ModelsealError, one_line  # noqa: E402
from modelseal.memory.locked import harden_process  # noqa: E402
from modelseal.serve.infer import runtime_refusal  # noqa: E402
from modelseal.triton.sealed import SealedModel, Tensors, version_of  # noqa: E402
from modelseal.triton.settings import model_spec, parameters, parse_settings  # noqa: E402

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # outside Triton's stub (documentation, type checks): nothing here can run
    pb_utils = None


def _message(exc: Exception) -> str:
    """A failure as one line for a client: ours say what to do; a framework's is named by its type only
    (its text may quote tensor values), unless it is a refusal of the request's values (400 in serve)."""
    if isinstance(exc, ModelsealError):
        return str(exc)
    refused = runtime_refusal(exc)
    return str(refused) if refused is not None else f"inference failed: {type(exc).__name__}"


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
        spec = self.model.spec
        batch: list[tuple[Tensors, list[str]]] = []
        for request in requests:
            inputs = {t.name: np.from_dlpack(pb_utils.get_input_tensor_by_name(request, t.name)) for t in spec.inputs}
            batch.append((inputs, list(request.requested_output_names()) or [t.name for t in spec.outputs]))
        responses = []
        for result in self.model.run_batch(batch):
            if isinstance(result, Exception):
                code = pb_utils.TritonError.UNAVAILABLE if self.model.refusal else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(_message(result), code)))
            else:
                tensors = [pb_utils.Tensor.from_dlpack(n, np.ascontiguousarray(a)) for n, a in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses

    def finalize(self) -> None:
        """Unload: stop the key watch, free the model and wipe what modelseal holds of it."""
        if self.model is not None:
            self.model.close()
            self.model = None
