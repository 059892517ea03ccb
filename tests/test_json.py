"""Shared JSON helpers: strict-JSON values and schema validation with a fallback."""

from __future__ import annotations

import builtins

from edgerep._json import finite, schema_problems

SCHEMA = {"type": "object", "required": ["a"], "properties": {"a": {"type": "integer"}}}


def test_finite_replaces_nan_and_inf_recursively():
    value = {"x": float("nan"), "y": [1.0, float("inf"), (2, float("-inf"))], "z": "s"}
    assert finite(value) == {"x": None, "y": [1.0, None, [2, None]], "z": "s"}


def test_schema_problems_with_jsonschema():
    assert schema_problems({"a": 1}, SCHEMA, lambda _: ["unused"]) == []
    problems = schema_problems({"a": "no"}, SCHEMA, lambda _: ["unused"])
    assert len(problems) == 1 and problems[0].startswith("a: ")


def test_schema_problems_falls_back_without_jsonschema(monkeypatch):
    real_import = builtins.__import__

    def no_jsonschema(name, *args, **kwargs):
        if name == "jsonschema":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jsonschema)
    assert schema_problems({}, SCHEMA, lambda inst: ["by hand"]) == ["by hand"]
