"""OpenAPI 3.1 documents for the replica and the router, built from the actor's endpoints."""

from __future__ import annotations

from typing import Any

from kubeforge import contract
from kubeforge.actor import EndpointInfo

_ERROR = {"$ref": "#/components/schemas/Error"}
_CALL_BODY = {
    "type": "object",
    "properties": {
        "args": {"type": "array"},
        "kwargs": {"type": "object"},
    },
    "additionalProperties": False,
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", **_json(_ERROR)} for c in codes}


def _get(summary: str) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": {"200": {"description": "ok"}}}}


def document(
    title: str,
    endpoints: dict[str, EndpointInfo] | None,
    router: bool,
) -> dict[str, Any]:
    session = {
        "name": contract.H_SESSION.decode(),
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
    }
    names = sorted(endpoints) if endpoints else None
    ep_param = {
        "name": "endpoint",
        "in": "path",
        "required": True,
        "schema": {"type": "string", **({"enum": names} if names else {})},
    }
    paths: dict[str, Any] = {
        f"{contract.CALL_PREFIX}{{endpoint}}": {
            "post": {
                "summary": "Call an endpoint on one replica (sticky when a session is given)",
                "parameters": [ep_param, session],
                "requestBody": {"required": False, **_json(_CALL_BODY)},
                "responses": {
                    "200": {"description": "result", **_json({"type": "object"})},
                    **_errors(400, 401, 404, 409, 413, 422, 500, 502, 503, 504),
                },
            }
        },
        contract.HEALTHZ: _get("Liveness and load"),
        contract.READYZ: _get("Readiness: 200 when taking calls, 503 otherwise"),
        "/metrics": _get("Prometheus metrics"),
    }
    if router:
        paths[f"{contract.CALL_ALL_PREFIX}{{endpoint}}"] = {
            "post": {
                "summary": "Broadcast a call to every healthy replica, results in replica order",
                "parameters": [ep_param],
                "requestBody": {"required": False, **_json(_CALL_BODY)},
                "responses": {
                    "200": {"description": "results", **_json({"type": "object"})},
                    **_errors(400, 401, 404, 503),
                },
            }
        }
        paths[contract.SESSIONS_PATH] = {
            "post": {
                "summary": "Start a session",
                "responses": {"201": {"description": "session"}, **_errors(401, 503)},
            }
        }
        sid = {"name": "session_id", "in": "path", "required": True, "schema": {"type": "string"}}
        paths[f"{contract.SESSIONS_PATH}/{{session_id}}"] = {
            "delete": {
                "summary": "End a session",
                "parameters": [sid],
                "responses": {"200": {"description": "ended"}, **_errors(401, 404)},
            }
        }
        for p in ("/v1/metrics", "/v1/metrics/summary", "/v1/replicas"):
            paths[p] = _get(p.rsplit("/", 1)[-1])
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": title, "version": "v1"},
        "paths": paths,
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {
                        "error": {
                            "type": "object",
                            "properties": {
                                "type": {"type": "string"},
                                "message": {"type": "string"},
                                "traceback": {"type": "string"},
                            },
                            "required": ["type", "message"],
                        }
                    },
                }
            },
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
        },
    }
    if endpoints:
        doc["x-kubeforge-endpoints"] = [e.describe() for e in endpoints.values()]
    return doc
