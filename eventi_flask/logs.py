"""Logging: one line per event, as text or as one JSON object a line (LOG_FORMAT=json)."""
import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "pid": record.process,
            "message": record.getMessage(),
        }
        for key in ("order_id", "outcome", "latency_ms"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            # exc_text, when set, is the redacted traceback (security.RedactingFilter).
            entry["exc"] = record.exc_text or self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(level, fmt):
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"))
    root = logging.getLogger("eventi_flask")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
