"""What a real SMTP server and Africa's Talking receive of the tickets' messages, paid order by paid order.

The journeys-family modes' --messages (bench/journeys.py's add_arguments) says what the server does with a
paid order's SMS and email:
- sandbox (the default): as configured out of the box, the SMS logged (SMS_MODE=sandbox), no email;
- off: SMS_MODE=off and no SMTP_URL, so no outbox row at all: worker CPU per journey without the messages;
- deliver (--deliver): a real SMTP server (aiosmtpd) and the Africa's Talking stand-in (bench/sms_standin.py),
  each on a spare port, in a child process of their own (python -m bench.delivery DIR), so that their CPU is
  neither the load generator's nor hidden: it is reported apart (stand_ins_cpu_s, over the measured part).

The child writes down every message as it arrives, before acknowledging it: an SMS as a JSON line of
DIR/sms.jsonl (when, to, text), an email as its bytes in a file and a JSON line of DIR/email.jsonl (when,
envelope recipients, file).  After the run (the outbox drained), `StandIns.report` finds each message's order
by the M-Pesa receipt it quotes (the SMS text and the email's plain part both do; receipts are unique) and
counts, for every paid order, the SMS and the emails it got, and how long after its completion (its
updated_at) the first of each arrived.  Wall clock on this one machine.
"""
import contextlib
import email
import email.policy
import json
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path

from .results import latency, spread
from .server import ROOT, database_engine

MESSAGES = ("sandbox", "deliver", "off")
CHANNELS = {"sms": "SMS", "email": "email"}
MAIL_FROM = "Eventi Tickets <tickets@eventi.test>"
RECEIPT_PREFIX = "receipt "  # "..., receipt SABC234XY. Show them ..." (SMS), "M-Pesa receipt SABC234XY." (email)


@contextlib.contextmanager
def providers(args):
    """The server's message providers for a run, by --messages: (environment for the server we start, entries
    for its Target: the stand-ins and their pid with `deliver`)."""
    chosen = getattr(args, "messages", "sandbox")
    if chosen == "off":
        yield {"SMS_MODE": "off", "SMTP_URL": None, "MAIL_FROM": None}, {}
    elif chosen == "deliver":
        with StandIns() as stand_ins:
            yield stand_ins.server_env(), {"delivery": stand_ins, "stand_ins_pid": stand_ins.proc.pid}
    else:
        yield {}, {}


@dataclass
class Received:
    channel: str
    at: float  # wall clock, seconds
    to: str  # the SMS's number (+2547...), the email's envelope recipient
    receipt: str | None  # the M-Pesa receipt it quotes


@dataclass
class PaidOrder:
    id: str
    phone: str
    email: str
    completed_at: float  # its updated_at, wall clock seconds


class StandIns:
    """The child process holding the SMTP server and the Africa's Talking stand-in, and what they received."""

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="eventi-bench-delivery-"))
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.delivery", str(self.directory)], cwd=ROOT,
                                     stdout=subprocess.PIPE)
        ready = self.proc.stdout.readline().decode().split()
        if ready[:1] != ["ready"]:
            self.__exit__()
            raise RuntimeError(f"the delivery stand-ins did not start (python -m bench.delivery {self.directory})")
        self.smtp_url, self.sms_url = ready[1], ready[2]
        print(f"stand-ins (pid {self.proc.pid}): SMTP {self.smtp_url}, Africa's Talking {self.sms_url}, "
              f"received in {self.directory}", file=sys.stderr)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stdout.close()

    def server_env(self):
        return {"SMS_MODE": "africastalking", "AFRICASTALKING_USERNAME": "eventi-bench",
                "AFRICASTALKING_API_KEY": "bench-key", "AFRICASTALKING_BASE_URL": self.sms_url,
                "SMTP_URL": self.smtp_url, "MAIL_FROM": MAIL_FROM}

    def received(self):
        """Every SMS and email the stand-ins acknowledged, as [Received]."""
        out = []
        for record in _json_lines(self.directory / "sms.jsonl"):
            out.append(Received("sms", record["at"], record["to"], quoted_receipt(record["text"])))
        for record in _json_lines(self.directory / "email.jsonl"):
            message = email.message_from_bytes((self.directory / record["file"]).read_bytes(),
                                               policy=email.policy.default)
            plain = message.get_body(("plain",))
            out.append(Received("email", record["at"], ",".join(record["to"]),
                                quoted_receipt(plain.get_content() if plain is not None else "")))
        return out

    def report(self, database_url):
        """Per channel: messages received, paid orders that got none and that got more than one, the first one's
        arrival after the order's completion (ms); paid orders with exactly one of each; messages naming no paid
        order (or quoting no receipt), and messages to another recipient than the order's."""
        by_receipt = paid_orders(database_url)
        orders = {order.id: order for order in by_receipt.values()}
        arrivals = {channel: {} for channel in CHANNELS}  # channel -> order id -> [arrival wall seconds]
        received = self.received()
        for_no_paid_order = to_another = 0
        for message in received:
            order = by_receipt.get(message.receipt)
            if order is None:
                for_no_paid_order += 1
                continue
            if message.to != recipient(order, message.channel):
                to_another += 1
            arrivals[message.channel].setdefault(order.id, []).append(message.at)
        per_channel = {channel: {
            "received": sum(1 for message in received if message.channel == channel),
            "orders_without": sum(1 for order_id in orders if order_id not in arrivals[channel]),
            "orders_with_more_than_one": sum(1 for times in arrivals[channel].values() if len(times) > 1),
            "after_completion_ms": spread((min(times) - orders[order_id].completed_at) * 1000
                                          for order_id, times in arrivals[channel].items()),
        } for channel in CHANNELS}
        return {
            "paid_orders": len(orders),
            "orders_with_one_of_each": sum(1 for order_id in orders
                                           if all(len(arrivals[c].get(order_id, ())) == 1 for c in CHANNELS)),
            **per_channel,
            "received_for_no_paid_order": for_no_paid_order,
            "received_by_another_recipient": to_another,
        }


def quoted_receipt(text):
    """The M-Pesa receipt a ticket message quotes, or None."""
    _, found, rest = text.partition(RECEIPT_PREFIX)
    receipt = rest.split(maxsplit=1)[0].rstrip(".") if found and rest.strip() else ""
    return receipt if receipt and receipt != "-" else None


def recipient(order, channel):
    return "+" + order.phone if channel == "sms" else order.email


def paid_orders(database_url):
    """{M-Pesa receipt: PaidOrder} of the completed orders in the server's database."""
    from sqlalchemy import text

    engine = database_engine(database_url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(text(
                "SELECT id, receipt, phone, email, updated_at FROM orders WHERE status = 'completed'")).all()
    finally:
        engine.dispose()
    return {receipt: PaidOrder(str(order_id), phone, address, _wall(updated))
            for order_id, receipt, phone, address, updated in rows}


def _wall(moment):
    return (moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)).timestamp()  # SQLite's are naive UTC


def _json_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def failures(report):
    """What the run's target fails on: a paid order without its SMS or email, or with two; a message to no paid
    order or to another recipient."""
    out = [f"delivered: {report[channel]['orders_without']} paid orders got no {name}, "
           f"{report[channel]['orders_with_more_than_one']} got more than one"
           for channel, name in CHANNELS.items()
           if report[channel]["orders_without"] or report[channel]["orders_with_more_than_one"]]
    if report["received_for_no_paid_order"] or report["received_by_another_recipient"]:
        out.append(f"delivered: {report['received_for_no_paid_order']} messages named no paid order, "
                   f"{report['received_by_another_recipient']} went to another recipient than the order's")
    return out


def summary(report):
    """A clause for a summary line ('' without --deliver)."""
    if not report:
        return ""
    return (f"; delivered to {report['paid_orders']} paid orders, one SMS and one email each "
            f"{report['orders_with_one_of_each']}: " + ", ".join(
                f"{name} {report[channel]['received']} (orders without {report[channel]['orders_without']}, "
                f"with more than one {report[channel]['orders_with_more_than_one']}, "
                f"{latency('after completion', report[channel]['after_completion_ms'])})"
                for channel, name in CHANNELS.items()))


# ---------------------------------------------------------------- the child process

def spare_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Mailbox:
    """aiosmtpd's handler: each email's bytes to a file of its own, then a line saying when, to whom, which file."""

    def __init__(self, directory):
        self.directory, self.count = directory, 0
        self.log = open(directory / "email.jsonl", "a", buffering=1)  # a line is written out whole, at once

    async def handle_DATA(self, server, session, envelope):
        at = time.time()
        self.count += 1  # only the controller's one event loop thread gets here
        name = f"{self.count}.eml"
        (self.directory / name).write_bytes(envelope.original_content or envelope.content)
        self.log.write(json.dumps({"at": at, "to": envelope.rcpt_tos, "file": name}) + "\n")
        return "250 Message accepted"


def serve_stand_ins(directory):
    """Both stand-ins on spare ports, until terminated; 'ready SMTP_URL SMS_BASE_URL' on stdout once they listen."""
    from aiosmtpd.controller import Controller

    from .sms_standin import AfricasTalkingStandIn

    class WritingStandIn(AfricasTalkingStandIn):
        """Writes each SMS down instead of keeping it (the benchmark reads the file)."""

        log = open(directory / "sms.jsonl", "a", buffering=1)

        def record(self, headers, form):
            self.log.write(json.dumps({"at": time.time(), "to": form.get("to"), "text": form.get("message", "")})
                           + "\n")

    # aiosmtpd's asyncio loop in a thread of its own; the stand-in on gevent's hub in this one (nothing patched).
    mailbox = Controller(Mailbox(directory), hostname="127.0.0.1", port=spare_port())
    mailbox.start()
    sms = WritingStandIn()
    print(f"ready smtp://127.0.0.1:{mailbox.port} {sms.url}", flush=True)
    sms.server.serve_forever()


if __name__ == "__main__":
    serve_stand_ins(Path(sys.argv[1]))
