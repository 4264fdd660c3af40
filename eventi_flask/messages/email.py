"""Email through any SMTP server (SMTP_URL): smtp:// with STARTTLS when the server offers it, or smtps://.

smtplib is plain Python over sockets, so under gevent's monkey-patching it waits cooperatively.
One connection per message: a sales opening's emails go out over MESSAGES_CONCURRENCY of them at once.
"""
import smtplib
import ssl
from email.message import EmailMessage
from email.utils import make_msgid
from urllib.parse import unquote, urlsplit

from . import texts
from .delivery import SendFailed

TIMEOUT = 20  # seconds, for each network operation


class SmtpMailer:
    def __init__(self, config):
        url = urlsplit(config["SMTP_URL"])
        self.implicit_tls = url.scheme == "smtps"
        self.host, self.port = url.hostname, url.port or (465 if self.implicit_tls else 587)
        self.username = unquote(url.username) if url.username else None
        self.password = unquote(url.password or "")
        self.sender = config["MAIL_FROM"]
        self.tls = ssl.create_default_context()  # made once: loading the CA certificates costs milliseconds

    def message(self, recipient, ticket, link):
        """The email for `ticket`: a plain-text and an HTML part, each ticket's QR code inline in the HTML."""
        message = EmailMessage()
        message["Subject"] = texts.email_subject(ticket.event_name)
        message["From"] = self.sender
        message["To"] = recipient
        message["Message-ID"] = make_msgid(domain=self.sender.rpartition("@")[2].strip("> ") or None)
        content_ids = {code: make_msgid(idstring=f"ticket-{index}")[1:-1] for index, code in enumerate(ticket.codes)}
        plain, html = texts.email_bodies(ticket, link, content_ids)
        message.set_content(plain)
        message.add_alternative(html, subtype="html")
        html_part = message.get_payload()[1]
        for code in ticket.codes:
            html_part.add_related(texts.qr_png(code), "image", "png", cid=f"<{content_ids[code]}>",
                                  filename=f"ticket-{code}.png")
        return message

    def send(self, recipient, ticket, link):
        """Send the email; its Message-ID, or SendFailed (permanent for a 5xx refusal of the recipient)."""
        try:
            message = self.message(recipient, ticket, link)
        except ValueError as exc:  # an address no header can carry
            raise SendFailed(f"not an address an email can be sent to: {exc}"[:500], permanent=True) from None
        try:
            with self._connect() as smtp:
                smtp.send_message(message)
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            refused = "; ".join(f"{code} {said.decode(errors='replace') if isinstance(said, bytes) else said}"
                                for code, said in exc.recipients.values())
            raise SendFailed(f"SMTP refused the recipient: {refused}"[:500],
                             permanent=all(500 <= code < 600 for code in codes)) from None
        except smtplib.SMTPNotSupportedError as exc:  # an address only SMTPUTF8 could carry, and no SMTPUTF8
            raise SendFailed(f"SMTP cannot carry the address: {exc}"[:500], permanent=True) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise SendFailed(f"SMTP: {type(exc).__name__}: {exc}"[:500]) from None
        return message["Message-ID"]

    def _connect(self):
        if self.implicit_tls:
            smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=TIMEOUT, context=self.tls)
        else:
            smtp = smtplib.SMTP(self.host, self.port, timeout=TIMEOUT)
            try:
                smtp.ehlo()
                if smtp.has_extn("starttls"):
                    smtp.starttls(context=self.tls)
                    smtp.ehlo()
            except BaseException:
                smtp.close()
                raise
        try:
            if self.username:
                smtp.login(self.username, self.password)
        except BaseException:
            smtp.close()
            raise
        return smtp
