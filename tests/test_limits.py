"""gateway/limits.py without a flow: the JSON nesting measure, the settings' checks, and the uvicorn workaround's
version fence. The limits on a real flow are in tests/test_security.py."""

from __future__ import annotations

import json

import pytest

from gateway.limits import HttpLimits, JsonError, json_depth, parse_json
from workarounds import UnverifiedVersion, uvicorn_protocols, versions


@pytest.mark.parametrize("text, depth", [
    ("", 0),
    ("5", 0),
    ('{"a": [1, {"b": []}]}', 4),
    ('{"a": "[[[{{{", "b": [1]}', 2),  # brackets inside strings do not nest
    ('["\\"[[", [1]]', 2),  # nor after an escaped quote
    ('["\\\\", [[1]]]', 3),  # an escaped backslash ends before the quote, which closes the string
    ('["\\\\\\"[[", [1]]', 2),
    ("[" * 10000 + "]" * 10000, 10000),
])
def test_json_depth_counts_the_nesting_of_arrays_and_objects_outside_strings(text, depth):
    assert json_depth(text.encode()) == depth
    if text and depth < 100:  # deeper than Python's parser goes
        assert json_depth(json.dumps(json.loads(text), indent=1).encode()) == depth  # whitespace changes nothing


async def test_parse_json_names_the_limit_or_the_syntax_error():
    limits = HttpLimits(max_json_depth=3)
    assert await parse_json('[[["ok"]]]', limits, "the body") == [[["ok"]]]
    with pytest.raises(JsonError, match=r"^the body nests arrays and objects deeper than the limit of 3 levels "
                                        r"\(max_json_depth\)$"):
        await parse_json("[[[[1]]]]", limits, "the body")
    with pytest.raises(JsonError, match="^the body is not valid JSON: Expecting"):
        await parse_json("[1,", limits, "the body")


@pytest.mark.parametrize("setting", ["max_body_bytes", "max_json_depth", "max_ws_message_bytes", "header_timeout_s"])
def test_a_limit_that_is_not_a_positive_number_fails_the_start_naming_it(setting):
    for wrong in (0, -1, "10", None, True):
        with pytest.raises(ValueError, match=f"^{setting} must be a number > 0, got "):
            HttpLimits(**{setting: wrong})


def test_the_uvicorn_workaround_refuses_a_version_it_was_not_verified_on(monkeypatch):
    uvicorn_protocols.install()  # the pinned versions
    real = versions.installed_version
    monkeypatch.setattr(versions, "installed_version", lambda name: "0.24.0" if name == "uvicorn" else real(name))
    with pytest.raises(UnverifiedVersion, match="workarounds.uvicorn_protocols was verified against uvicorn 0.23.x; "
                                                "0.24.0 is installed: re-run tests/test_security.py"):
        HttpLimits().uvicorn_kwargs()
