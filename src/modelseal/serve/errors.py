"""Errors a request can end with, carrying both transports' codes so HTTP and gRPC say the same thing."""

from __future__ import annotations

from modelseal.errors import ModelsealError

# HTTP status -> gRPC status code name
GRPC_CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 409: "FAILED_PRECONDITION",
              413: "RESOURCE_EXHAUSTED",
              429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}  # fmt: skip


class ServeError(ModelsealError):
    """A request refused or failed: ``status`` (HTTP) and :attr:`grpc_code`; the message is for the client
    and never holds tensor data or key material. ``retry_after``: whole seconds a refused client should
    wait (HTTP ``Retry-After``, gRPC ``retry-after`` trailing metadata), where the refusal knows them."""

    retry_after: int | None = None

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    @property
    def grpc_code(self) -> str:
        return GRPC_CODES.get(self.status, "UNKNOWN")


def bad_request(message: str) -> ServeError:
    return ServeError(400, message)


def not_found(message: str) -> ServeError:
    return ServeError(404, message)


def unavailable(message: str) -> ServeError:
    return ServeError(503, message)
