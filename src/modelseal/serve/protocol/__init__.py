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


@functools.cache
def tfserving() -> Any:
    """Messages of TF Serving's API (``tfserving.proto``), as attributes of the returned namespace.

    Compiled by grpcio-tools' protoc in a child process, which hands back the file's descriptors; only
    those are loaded here. In a process that has imported TensorFlow, running protoc in-process (as
    ``grpc.protos`` does) crashes it with a segmentation fault (TensorFlow's own protobuf library clashes
    with the compiler's), and a server whose SavedModels import TensorFlow may be asked for these late.
    """
    import subprocess
    import sys
    import types
    from pathlib import Path

    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    try:
        import grpc_tools
    except ImportError:
        raise MissingDependencyError("serving needs grpcio and grpcio-tools: pip install 'modelseal[serve]'") from None
    root = Path(__file__).resolve().parents[3]  # the directory holding the modelseal package
    includes = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
    name = "modelseal/serve/protocol/tfserving.proto"
    compiled = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"-I{includes}", "--include_imports",
         "--descriptor_set_out=/dev/stdout", name],
        capture_output=True, timeout=120, check=False,
    )  # fmt: skip
    if compiled.returncode != 0:
        raise MissingDependencyError(f"cannot compile {name}: {compiled.stderr.decode(errors='replace')[:300]}")
    pool = descriptor_pool.Default()
    for file in descriptor_pb2.FileDescriptorSet.FromString(compiled.stdout).file:
        try:
            pool.FindFileByName(file.name)  # google/protobuf/*.proto: already there
        except KeyError:
            pool.Add(file)
    messages = pool.FindFileByName(name).message_types_by_name
    classes = {n: message_factory.GetMessageClass(d) for n, d in messages.items()}
    enums = {n: d for n, d in pool.FindFileByName(name).enum_types_by_name.items()}
    return types.SimpleNamespace(**classes, enums=enums)
