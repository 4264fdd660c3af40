"""SMS through Africa's Talking's messaging API, as ../shared/API.md fixes it; or, in the sandbox, a log line."""
import logging

import requests

from .delivery import SendFailed

log = logging.getLogger(__name__)

TIMEOUT = (5, 20)  # connect, read: seconds
# Recipients[0].statusCode: handed to the operators (Processed, Sent, Queued) ...
DELIVERED = {100, 101, 102}
# ... refused for good: RiskHold, InvalidSenderId, InvalidPhoneNumber, UnsupportedNumberType, UserInBlacklist,
# CouldNotRoute.  Any other code (InsufficientBalance, DoNotDisturbRejection, 5xx) is tried again later.
REFUSED = {401, 402, 403, 404, 406, 407}


class AfricasTalking:
    def __init__(self, config):
        self.mode = config["SMS_MODE"]
        self.url = config["AFRICASTALKING_BASE_URL"] + "/version1/messaging"
        self.username = config["AFRICASTALKING_USERNAME"]
        self.api_key = config["AFRICASTALKING_API_KEY"]
        self.sender_id = config["AFRICASTALKING_SENDER_ID"]
        self.http = requests.Session()  # kept-alive connections: no TLS handshake per message

    def send(self, phone, text):
        """Send `text` to `phone` (2547XXXXXXXX); Africa's Talking's messageId (None in the sandbox), or SendFailed."""
        to = "+" + phone
        if self.mode == "sandbox":
            log.info("SMS not sent (SMS_MODE=sandbox) to %s: %s", to, text)
            return None
        form = {"username": self.username, "to": to, "message": text}
        if self.sender_id:
            form["from"] = self.sender_id
        try:
            response = self.http.post(self.url, data=form, timeout=TIMEOUT,
                                      headers={"apiKey": self.api_key, "Accept": "application/json"})
        except requests.RequestException as exc:
            raise SendFailed(f"Africa's Talking unreachable: {type(exc).__name__}") from None
        if not 200 <= response.status_code < 300:
            raise SendFailed(f"Africa's Talking answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            recipient = response.json()["SMSMessageData"]["Recipients"][0]
            code = int(recipient["statusCode"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise SendFailed(f"Africa's Talking's answer has no recipient status: {response.text[:200]}") from None
        said = f"statusCode {code} {recipient.get('status', '')}".strip()
        if code in DELIVERED:
            return recipient.get("messageId")
        raise SendFailed(f"Africa's Talking: {said}", permanent=code in REFUSED)
