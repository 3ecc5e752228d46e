"""``modelseal serve``: an inference server for sealed models speaking the Open Inference Protocol
(KServe V2 / Triton) over HTTP and gRPC.

Layers, each usable alone: :mod:`.repository` (Triton-layout model repository and configs),
:mod:`.runtimes` (ONNX Runtime, PyTorch; a model in memory, from a sealed artifact), :mod:`.models`
(load/unload, instances, dynamic batching, key revocation), and the transports :mod:`.http` and
:mod:`.grpc` that only translate the protocol.
"""
