"""The app's OpenAPI document, with the request bodies the handlers parse by hand.

The POST handlers read their JSON themselves (to answer 413 / 400 in the OpenAI error shape
rather than FastAPI's 422), so FastAPI sees no body parameter and its generated schema has no
`requestBody`. Here the pydantic request models' JSON schemas are added to that document, so
clients, docs and schema fuzzers see what /v1/chat/completions and /v1/completions take.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from cluster.api import ChatCompletionRequest, CompletionRequest

BODIES: dict[str, type[BaseModel]] = {"/v1/chat/completions": ChatCompletionRequest,
                                      "/v1/completions": CompletionRequest}
REF = "#/components/schemas/{model}"


def with_request_bodies(document: dict) -> dict:
    """`document` with a JSON requestBody (and its component schemas) on each POST in BODIES."""
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for path, model in BODIES.items():
        operation = document.get("paths", {}).get(path, {}).get("post")
        if operation is None:
            continue
        body = model.model_json_schema(ref_template=REF)
        schemas.update(body.pop("$defs", {}))
        schemas[model.__name__] = body
        operation["requestBody"] = {"required": True, "content": {
            "application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}}}
    return document


def describe_request_bodies(app: FastAPI) -> None:
    """Make `app.openapi()` (and /openapi.json) include the hand-parsed request bodies."""
    def openapi() -> dict:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version,
                                   description=app.description, routes=app.routes)
            app.openapi_schema = with_request_bodies(document)
        return app.openapi_schema
    app.openapi = openapi
