"""The protocol definitions (``.proto``), compiled in memory by grpcio-tools on first use."""

from __future__ import annotations

import functools
from typing import Any

from modelseal.errors import MissingDependencyError


@functools.cache
def inference() -> tuple[Any, Any]:
    """(messages, services) of the ``inference.GRPCInferenceService`` protocol."""
    try:
        import grpc
    except ImportError:
        raise MissingDependencyError("serving needs grpcio and grpcio-tools: pip install 'modelseal[serve]'") from None
    return grpc.protos_and_services("modelseal/serve/protocol/inference.proto")  # type: ignore[no-any-return]


@functools.cache
def model_config() -> Any:
    """Messages of the model configuration schema (config.pbtxt / config.yaml)."""
    try:
        import grpc
    except ImportError:
        raise MissingDependencyError("serving needs grpcio and grpcio-tools: pip install 'modelseal[serve]'") from None
    return grpc.protos("modelseal/serve/protocol/model_config.proto")
