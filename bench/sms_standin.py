"""A stand-in for Africa's Talking's messaging API, for the tests and the benchmarks: python -m bench.sms_standin PORT.

POST /version1/messaging as its documentation gives it: a form in (username, to, message, from), 201 and
SMSMessageData out, each recipient "Success" (statusCode 101) unless told otherwise.
"""
import json
import sys
import uuid
from urllib.parse import parse_qs

from gevent.pywsgi import WSGIServer

AT_STATUS = {100: "Processed", 101: "Success", 102: "Queued", 401: "RiskHold", 402: "InvalidSenderId",
             403: "InvalidPhoneNumber", 404: "UnsupportedNumberType", 405: "InsufficientBalance",
             406: "UserInBlacklist", 407: "CouldNotRoute", 409: "DoNotDisturbRejection", 500: "InternalServerError",
             501: "GatewayError", 502: "RejectedByGateway"}


class AfricasTalkingStandIn:
    """POST /version1/messaging as Africa's Talking documents it: form in, 201 and SMSMessageData out."""

    def __init__(self, port=0):
        self.received = []  # (headers, form) of every request
        self.codes = {}  # "+2547..." -> the statusCode to answer for it (else 101 Success)
        self.http_status = None  # set: answer every request with this HTTP error instead
        self.server = WSGIServer(("127.0.0.1", port), self, log=None)
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __call__(self, environ, start_response):
        body = environ["wsgi.input"].read().decode()
        form = {key: values[0] for key, values in parse_qs(body).items()}
        headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items()
                   if key.startswith("HTTP_")}
        if environ["PATH_INFO"] != "/version1/messaging" or environ["REQUEST_METHOD"] != "POST":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found"]
        if self.http_status is not None:
            start_response(f"{self.http_status} Error", [("Content-Type", "text/plain")])
            return [b"The service is unavailable"]
        self.record(headers, form)
        code = self.codes.get(form.get("to"), 101)
        answer = {"SMSMessageData": {"Message": "Sent to 1/1 Total Cost: KES 0.8000", "Recipients": [
            {"statusCode": code, "number": form.get("to"), "status": AT_STATUS[code], "cost": "KES 0.8000",
             "messageId": f"ATXid_{uuid.uuid4().hex}"}]}}
        start_response("201 Created", [("Content-Type", "application/json")])
        return [json.dumps(answer).encode()]

    def record(self, headers, form):
        """Keep a request it accepted (the benchmarks' stand-ins write it down instead: bench/delivery.py)."""
        self.received.append((headers, form))

    def to(self, phone):
        return [form for _, form in self.received if form["to"] == phone]

    def stop(self):
        self.server.stop()


if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()
    stand_in = AfricasTalkingStandIn(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(f"Africa's Talking stand-in on {stand_in.url}", flush=True)
    stand_in.server.serve_forever()
