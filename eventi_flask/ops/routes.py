"""Health, readiness and metrics for the platform and for people on call."""
from flask import Blueprint, Response, jsonify
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import text

from .. import metrics
from ..extensions import db
from ..notify.service import get_hub

bp = Blueprint("ops", __name__)


@bp.get("/healthz")
def healthz():
    """Liveness.
    ---
    get:
      summary: 200 while the process runs
      tags: [operations]
      responses:
        200: {description: Alive., content: {application/json: {schema: HealthSchema}}}
    """
    return jsonify({"status": "ok"})


@bp.get("/readyz")
def readyz():
    """Readiness.
    ---
    get:
      summary: 200 when the database and Redis (if configured) answer
      tags: [operations]
      responses:
        200: {description: Ready., content: {application/json: {schema: ReadinessSchema}}}
        503: {description: Not ready; `checks` says what is not., content: {application/json: {schema: ReadinessSchema}}}
    """
    checks = {}
    try:
        db.session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # any driver error means "not ready", never a 500
        checks["database"] = f"error: {type(exc).__name__}"
    finally:
        db.session.remove()
    ok, detail = get_hub().ready()
    checks["notifications"] = "ok" if ok else f"error: {detail}"
    ready = all(value == "ok" for value in checks.values())
    response = jsonify({"status": "ready" if ready else "unavailable", "checks": checks})
    response.status_code = 200 if ready else 503
    response.headers["Cache-Control"] = "no-store"
    return response


@bp.get("/metrics")
def prometheus_metrics():
    return Response(generate_latest(metrics.registry), mimetype=CONTENT_TYPE_LATEST)
