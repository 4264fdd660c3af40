"""What a completed order's messages say: the SMS text (within one 160-character GSM SMS) and the email.

Made when a message is sent, from the order as stored (ticket.py reads it), so nothing is
rendered inside the transaction that completes the order.
"""
import io
import unicodedata

import segno
from jinja2 import Environment, PackageLoader, select_autoescape

from ..clock import east_africa_time

SMS_LIMIT = 160  # GSM 03.38 septets in one SMS; beyond it the message is split (and charged) in parts
# GSM 03.38's default alphabet (one septet each) and its extension table (two: an escape, then the character).
GSM_BASIC = set("@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?¡ABCDEFGHIJKLMNOPQRSTUVWXYZ"
                "ÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà")
GSM_EXTENDED = set("^{}\\[~]|€\f")
ELLIPSIS = "..."


def gsm_length(text):
    """Septets `text` takes in the GSM alphabet; ValueError for a character outside it (that would need UCS-2)."""
    length = 0
    for char in text:
        if char in GSM_BASIC:
            length += 1
        elif char in GSM_EXTENDED:
            length += 2
        else:
            raise ValueError(f"{char!r} is not in the GSM alphabet")
    return length


def to_gsm(text):
    """`text` in the GSM alphabet: accents dropped where that makes it fit (Ngũgĩ -> Ngugi), anything else '?'.

    One character outside the alphabet would send the whole SMS as UCS-2, 70 characters at most."""
    out = []
    for char in text:
        if char in GSM_BASIC or char in GSM_EXTENDED:
            out.append(char)
            continue
        plain = "".join(c for c in unicodedata.normalize("NFKD", char) if not unicodedata.combining(c))
        out.append(plain if plain and all(c in GSM_BASIC for c in plain) else "?")
    return "".join(out)


def _fit(name, room):
    """`name` cut to `room` septets at most, marked with an ellipsis when it was cut."""
    if gsm_length(name) <= room:
        return name
    while name and gsm_length(name) + len(ELLIPSIS) > room:
        name = name[:-1]
    return name.rstrip() + ELLIPSIS if name else ""


def sms_text(event_name, quantity, receipt, link):
    """`<event name>: <n> ticket(s) paid, receipt <receipt>. Show them at the gate: <link>` (API.md), at most
    160 GSM septets: the event name is shortened to fit, and left out only when nothing else would."""
    rest = to_gsm(f": {quantity} ticket(s) paid, receipt {receipt or '-'}. Show them at the gate: {link}")
    name = _fit(to_gsm(event_name.strip()), SMS_LIMIT - gsm_length(rest))
    return (name + rest) if name else rest[2:]


_templates = Environment(loader=PackageLoader("eventi_flask.messages", "templates"),
                         autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def email_subject(event_name):
    return f"Your tickets for {event_name}"


def qr_png(code):
    """A ticket's code as a PNG QR code a gate scanner reads from a phone's screen."""
    buffer = io.BytesIO()
    segno.make_qr(code, error="m").save(buffer, kind="png", scale=6, border=4)
    return buffer.getvalue()


def email_bodies(ticket, link, content_ids):
    """(plain text, HTML) of the email for `ticket` (ticket.py's TicketMessage); `content_ids`: each ticket
    code's inline QR image, by its Content-ID without the angle brackets."""
    values = {"ticket": ticket, "link": link, "starts": east_africa_time(ticket.starts_at), "content_ids": content_ids}
    return _templates.get_template("tickets.txt").render(values), _templates.get_template("tickets.html").render(values)
