"""schemathesis against the server's own OpenAPI schema: whatever it sends, never a 5xx.

Generated bodies are mostly invalid (wrong types, out-of-range numbers, odd strings) and some
valid; each operation gets a few dozen examples, so this stays a few seconds long. (The
operations are driven with hypothesis directly: schemathesis' lazy pytest fixture loader does
not run under this pytest.)
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings


def test_no_input_makes_a_5xx(server):
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= paths
    seen: dict[int, int] = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=20, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            response = case.call(timeout=60)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.path, case.body, response.text[:300])

        call()
    assert any(code == 200 for code in seen) and any(400 <= code < 500 for code in seen)
