"""The ticket link, /t/<token>: an order's tickets reached without its status page.

The token is `<order id>.<signature>`: the order id (128 random bits) and an HMAC-SHA256
of it under TICKET_LINK_SECRET, truncated to 128 bits.  45 URL-safe characters, short
enough for the SMS that carries it.  A token is good for as long as its secret is; a
secret is rotated by moving it to TICKET_LINK_SECRET_PREVIOUS (still accepted, never
used to sign) and setting a new one.
"""
import functools
import hashlib

from flask import current_app
from itsdangerous import BadSignature, Signer
from itsdangerous.encoding import base64_decode, base64_encode
from itsdangerous.signer import HMACAlgorithm

SALT = "eventi.ticket-link"
SIGNATURE_BYTES = 16  # 128 bits: forging one is 2**-128 a try; the full 256 would add 21 characters to an SMS


class TruncatedHMAC(HMACAlgorithm):
    def get_signature(self, key, value):
        return super().get_signature(key, value)[:SIGNATURE_BYTES]


@functools.lru_cache(maxsize=8)
def _signer(current, previous):
    # itsdangerous signs with the last key and accepts any of them.
    keys = [previous, current] if previous else [current]
    return Signer(keys, salt=SALT, key_derivation="hmac", digest_method=hashlib.sha256,
                  algorithm=TruncatedHMAC(hashlib.sha256))


def _app_signer():
    config = current_app.config
    return _signer(config["TICKET_LINK_SECRET"], config.get("TICKET_LINK_SECRET_PREVIOUS"))


def ticket_token(order_id):
    """The signed token of `order_id`'s ticket link."""
    return _app_signer().sign(order_id).decode("ascii")


def order_id_from_token(token):
    """The order id `token` was signed for, or None: forged, altered, or under a secret no longer accepted."""
    try:
        order_id = _app_signer().unsign(token).decode("ascii")
    except (BadSignature, UnicodeError):
        return None
    # Base64's last character carries spare bits: a token with them altered would still verify.
    # Only the one spelling a link was given in is accepted.
    signature = token.rsplit(".", 1)[1]
    return order_id if base64_encode(base64_decode(signature)).decode("ascii") == signature else None


def ticket_url(order_id):
    """The absolute ticket link of `order_id`, as the SMS, the email and the order's JSON give it."""
    return f"{current_app.config['PUBLIC_BASE_URL']}/t/{ticket_token(order_id)}"
