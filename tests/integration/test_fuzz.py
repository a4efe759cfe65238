"""Schemathesis against the gateway's and the query service's OpenAPI documents: no 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok

from services.stack import Stack
from tests.conftest import running_stack, stack_settings

# Bounded so that both documents are done in well under two minutes; derandomized so that a
# run is the same run every time (a failure found once is found again).
FUZZ = settings(
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Stack]:
    """A private stack (fuzzing deletes and uploads at random) without rate limits."""
    env = stack_settings(
        tmp_path_factory.mktemp("fuzz"), tiny_model, RATE_LIMIT_UPLOADS="", RATE_LIMIT_SEARCHES=""
    )
    with running_stack(env) as stack:
        yield stack


def fuzz(base_url: str) -> list[str]:
    """Every operation of the service's OpenAPI document, valid and invalid input: any 5xx."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures: list[str] = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the document itself must be valid
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @FUZZ
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case: schemathesis.Case) -> None:
                case.call_and_validate(checks=[not_a_server_error], timeout=60)

            try:
                run()
            except Unsatisfiable:
                continue  # nothing invalid to send (no parameters)
            except Exception as exc:
                failures.append(f"{operation.label} [{mode.value}]: {exc}")
    return failures


def test_gateway_answers_any_request_without_a_server_error(fuzzed: Stack) -> None:
    failures = fuzz(fuzzed.gateway_url)
    assert not failures, "\n\n".join(failures)


def test_query_service_answers_any_request_without_a_server_error(fuzzed: Stack) -> None:
    failures = fuzz(fuzzed.query_url)
    assert not failures, "\n\n".join(failures)
