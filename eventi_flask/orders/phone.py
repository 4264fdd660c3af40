"""Kenyan M-Pesa phone numbers: normalised to 2547XXXXXXXX / 2541XXXXXXXX."""
import re

# [0-9], not \d: Python's \d takes any script's digits; M-Pesa and the browser want ASCII.
PHONE = re.compile(r"^(?:\+?254|0)?([17][0-9]{8})$")
SEPARATORS = re.compile(r"[\s\-().]")
# The same rule as one pattern, separators allowed anywhere: for the OpenAPI document.
_S = SEPARATORS.pattern + "*"
PHONE_WITH_SEPARATORS = f"^{_S}(?:(?:\\+{_S})?2{_S}5{_S}4{_S}|0{_S})?[17](?:{_S}[0-9]){{8}}{_S}$"


def normalize_phone(raw):
    """Return the 12-digit 254... form, or None when `raw` is not a Kenyan mobile number."""
    if not isinstance(raw, str):
        return None
    match = PHONE.match(SEPARATORS.sub("", raw))
    return "254" + match.group(1) if match else None


def mask_phone(phone):
    """2547******78: enough for a customer to recognise, too little to misuse."""
    if not phone or len(phone) < 6:
        return "***"
    return phone[:4] + "*" * (len(phone) - 6) + phone[-2:]
