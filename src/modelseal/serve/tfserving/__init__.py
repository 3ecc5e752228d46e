"""TF Serving's API (``tensorflow.serving.PredictionService`` and ``ModelService`` over gRPC, ``/v1/models``
over REST) on ``modelseal serve``'s ports, so that TF Serving's clients reach sealed models unchanged:
:mod:`.tensors` (TensorProto and JSON tensors), :mod:`.api` (the methods, transport-free),
:mod:`.grpc_api` and :mod:`.rest` (the transports)."""
