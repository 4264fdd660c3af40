"""The OpenAPI document: valid, generated from the app, and true to every route under /api."""
import pytest
from openapi_spec_validator import validate

from eventi_flask.openapi.spec import OPERATIONS_PATHS

FLASK_METHODS = {"HEAD", "OPTIONS"}  # added by Flask to every rule; not operations of ours


def _app_operations(app):
    operations = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith("/api/") or rule.rule in OPERATIONS_PATHS:
            path = rule.rule.replace("<", "{").replace(">", "}")
            operations |= {(path, method.lower()) for method in rule.methods - FLASK_METHODS}
    return operations


def _document_operations(document):
    return {(path, method) for path, item in document["paths"].items() for method in item if method != "parameters"}


@pytest.mark.parametrize("backend", ["sqlite-local"], indirect=True)
def test_the_document_validates_and_matches_the_routes(client, app):
    response = client.get("/api/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    validate(document)  # raises with the offending part of the document
    assert document["openapi"] == "3.1.0"
    assert _document_operations(document) == _app_operations(app)
    for path, method in _document_operations(document):
        operation = document["paths"][path][method]
        assert operation["responses"], f"{method.upper()} {path} documents no answer"
        for status, answer in operation["responses"].items():
            assert "$ref" in answer or "content" in answer, f"{method.upper()} {path} {status} has no schema"


@pytest.mark.parametrize("backend", ["sqlite-local"], indirect=True)
def test_the_document_says_what_the_wait_and_the_errors_are(client, app):
    document = client.get("/api/openapi.json").get_json()
    wait = document["paths"]["/api/orders/{order_id}/wait"]["get"]
    parameters = {parameter["name"]: parameter for parameter in wait["parameters"]}
    # The bound is the running app's setting, read where the route checks it.
    assert parameters["timeout"]["schema"]["maximum"] == app.config["WAIT_TIMEOUT_MAX"]
    assert parameters["since"]["schema"]["type"] == "integer"
    busy = document["components"]["responses"]["ServiceUnavailable"]
    assert busy["headers"]["Retry-After"]["required"] is True
    assert busy["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    assert document["components"]["schemas"]["ErrorDetail"]["required"] == ["code", "fields", "message"]
    callback = document["paths"]["/api/payhero/callback"]["post"]
    shapes = callback["requestBody"]["content"]["application/json"]["schema"]["oneOf"]
    assert [shape["$ref"].rsplit("/", 1)[1] for shape in shapes] == ["ClassicCallback", "FlatCallback"]
