"""``modelseal serve``: an inference server for sealed models speaking the Open Inference Protocol
(KServe V2 / Triton) over HTTP and gRPC.

Layers, each usable alone: :mod:`.repository` (Triton-layout model repository and configs),
:mod:`.source` (a model version's artifact, opened and unlocked once per load), :mod:`.runtimes`
(the runtime registry and one module per framework: a model in memory), :mod:`.models` (load/unload,
instances, dynamic batching), :mod:`.keywatch` (key revocation), :mod:`.infer` (requests decoded,
validated and responses encoded, for both transports), and the transports :mod:`.rest` and
:mod:`.grpc_api` that only move bytes.
"""
