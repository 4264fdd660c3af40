"""A real SMTP server for the tests (aiosmtpd), in a process of its own:
python tests/smtp_server.py PORT DIR [CERT KEY USER PASSWORD].

Every message accepted is written to DIR as one .eml file (written whole, then renamed).  A recipient
whose address starts with `refused` is refused for good (550), as a server refuses an unknown mailbox.
With a certificate, its key and a login, it offers STARTTLS and requires it, then that login.
"""
import os
import ssl
import sys
import time
import uuid

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult


class Store:
    def __init__(self, directory):
        self.directory = directory

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.startswith("refused"):
            return "550 5.1.1 No such mailbox here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        name = uuid.uuid4().hex
        partial = os.path.join(self.directory, name + ".part")
        with open(partial, "wb") as file:
            file.write(envelope.original_content or envelope.content)
        os.rename(partial, os.path.join(self.directory, name + ".eml"))
        return "250 Message accepted"


if __name__ == "__main__":
    port, directory = int(sys.argv[1]), sys.argv[2]
    secured = {}
    if len(sys.argv) > 3:
        cert, key, user, password = sys.argv[3:7]
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(cert, key)

        def authenticate(server, session, envelope, mechanism, login):
            granted = (login.login, login.password) == (user.encode(), password.encode())
            return AuthResult(success=granted, handled=False)  # handled=False: aiosmtpd answers 235 or 535

        secured = dict(tls_context=tls, require_starttls=True, auth_required=True, authenticator=authenticate)
    controller = Controller(Store(directory), hostname="127.0.0.1", port=port, **secured)
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        controller.stop()
