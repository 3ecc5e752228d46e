"""Fuzz the key service's HTTP API from its own OpenAPI document (schemathesis): never a 5xx, and every
answer matches the documented status codes, content type and schema."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from modelseal.keyserver.openapi import openapi_document
from modelseal.pki import identity_of_cert_file

from .services import KeyServer

pytestmark = pytest.mark.slow  # real processes (servers, CLI): the full suite, not the fast tier

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def fuzz_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KeyServer, requests.Session]]:
    directory: Path = tmp_path_factory.mktemp("fuzz")
    server = KeyServer(directory / "ks", None).start()
    cert = server.host_cert("fuzz-host")
    with server.admin() as admin:  # something real to hit: a model, a key, a grant for the fuzzing host
        admin.call("POST", "/v1/admin/models", {"model": "m"})
        admin.call("POST", "/v1/admin/keys", {"model": "m", "key": "A" * 43})
        admin.call("POST", "/v1/admin/grants", {"model": "m", "identity": identity_of_cert_file(cert[0]).spki})
    session = requests.Session()
    session.verify, session.cert = server.ca, cert
    session.headers["Authorization"] = f"Bearer {server.token}"
    try:
        yield server, session
    finally:
        session.close()
        server.stop()


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_with_a_server_error(
    case: schemathesis.Case, fuzz_target: tuple[KeyServer, requests.Session]
) -> None:
    server, session = fuzz_target
    if case.path == "/v1/admin/master-key/rotate":
        case.headers = {**(case.headers or {}), "Authorization": "Bearer wrong"}  # keep the fuzzing fast
    case.call_and_validate(
        base_url=server.url,
        session=session,
        verify=session.verify,
        cert=session.cert,
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )
