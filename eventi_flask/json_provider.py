"""JSON bodies are read by a provider that refuses deep nesting before parsing.

Python's parser recurses once per level: a body nested thousands deep ("[" * 50000)
reaches the interpreter's recursion limit, and whatever else runs at that depth
meanwhile (a garbage collection calling a finalizer) fails with it.  No body we
accept nests more than a few levels, so such a body is refused as not JSON at once.
"""
import re

from flask.json.provider import DefaultJSONProvider

MAX_DEPTH = 32
_STRING = re.compile(rb'"(?:\\.|[^"\\])*"')  # brackets inside strings do not nest
_BRACKET = re.compile(rb"[\[\]{}]")


def too_deep(raw, limit=MAX_DEPTH):
    """True when the JSON text `raw` opens more than `limit` arrays or objects inside each other."""
    if isinstance(raw, str):
        raw = raw.encode()
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return False  # every body we expect: no scan at all
    depth = 0
    for bracket in _BRACKET.findall(_STRING.sub(b"", raw)):
        depth += 1 if bracket in b"[{" else -1
        if depth > limit:
            return True
    return False


class JSONProvider(DefaultJSONProvider):
    sort_keys = False

    def loads(self, s, **kwargs):
        if too_deep(s):
            raise ValueError(f"JSON nested more than {MAX_DEPTH} levels deep")
        return super().loads(s, **kwargs)
