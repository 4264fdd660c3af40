"""Server-rendered pages (see issue: checkout and payment-status pages)."""
from flask import Blueprint

bp = Blueprint("web", __name__, template_folder="templates", static_folder="static", static_url_path="/static")
