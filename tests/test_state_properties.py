"""The state machine under late, repeated and out-of-order payment outcomes (hypothesis).

One ticket type with few tickets and several orders; payment results arrive in
any order, any number of times, after expiry or not, some naming another
order's payment.  A small in-memory stand-in does what the service does
around decide_payment(): holds tickets when an order is created, gives them
back when a pending order fails, takes them back (only if free) for a late
success.  What must hold whatever happens: tickets held never exceed the
quantity, a completed order never changes, every confirmed success ends
completed or refund due, and one payment is on one order at most.
"""
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from eventi_flask.orders.state import Decision, PaymentOutcome, Status, decide_payment, holds_tickets

PRICE = 300
FAILURE_CODES = [1, 1032, 1037, 1019, 17, 2001, 1001, 9999]


@dataclass
class Order:
    number: int
    quantity: int
    status: Status = Status.PENDING
    refund_due: bool = False
    receipt: str | None = None
    completed_as: tuple | None = None  # (status, receipt) when it completed, never to change

    @property
    def amount(self):
        return PRICE * self.quantity


@dataclass
class Shop:
    capacity: int
    reserved: int = 0
    orders: list = field(default_factory=list)
    confirmed: set = field(default_factory=set)  # orders PayHero confirmed a payment of their own for

    def create(self, quantity):
        if self.capacity - self.reserved >= quantity:  # rows.create_order's guarded reservation
            self.reserved += quantity
            self.orders.append(Order(len(self.orders), quantity))

    def hold_again(self, quantity):
        if self.capacity - self.reserved < quantity:  # rows.hold_tickets_again
            return False
        self.reserved += quantity
        return True

    def expire(self, order):  # service._fail_if_pending: reconcile's expiry, a refused STK push
        if order.status is Status.PENDING:
            order.status = Status.FAILED
            self.reserved -= order.quantity

    def deliver(self, order, outcome):  # service.apply_payment_outcome, under the order's row lock
        paid_another_order = outcome.success and any(
            other is not order and other.receipt == outcome.receipt for other in self.orders)
        transition, _ = decide_payment(order.status, order.amount, outcome, order.refund_due, paid_another_order,
                                       lambda: self.hold_again(order.quantity))
        if transition.decision is Decision.APPLY:
            order.status = transition.status
            order.receipt = outcome.receipt
            if transition.releases_tickets:
                self.reserved -= order.quantity
        elif transition.decision is Decision.REFUND_DUE:
            order.refund_due, order.receipt = True, outcome.receipt
        if order.status is Status.COMPLETED and order.completed_as is None:
            order.completed_as = (order.status, order.receipt)
        return transition


def receipt_of(order):
    return f"SRCPT{order.number:05d}"


steps = st.lists(st.tuples(
    st.sampled_from(["create", "success", "failure", "expire", "reused", "wrong_amount"]),
    st.integers(0, 9),  # which order (modulo how many there are)
    st.sampled_from(FAILURE_CODES),
    st.integers(1, 2),  # a new order's quantity
), max_size=40)


@settings(max_examples=300, deadline=None)
@given(capacity=st.integers(1, 4), first_orders=st.lists(st.integers(1, 2), min_size=1, max_size=4), steps=steps)
def test_money_and_tickets_add_up_whatever_order_outcomes_arrive_in(capacity, first_orders, steps):
    shop = Shop(capacity)
    for quantity in first_orders:
        shop.create(quantity)
    for kind, which, code, quantity in steps:
        if kind == "create" or not shop.orders:
            shop.create(quantity)
            continue
        order = shop.orders[which % len(shop.orders)]
        if kind == "success":
            shop.deliver(order, PaymentOutcome(success=True, result_code=0, amount=order.amount,
                                               receipt=receipt_of(order)))
            shop.confirmed.add(order.number)
        elif kind == "failure":
            shop.deliver(order, PaymentOutcome(success=False, result_code=code))
        elif kind == "expire":
            shop.expire(order)
        elif kind == "reused":  # another order's payment, presented as this one's
            other = shop.orders[(which + 1) % len(shop.orders)]
            if other is not order and other.receipt is not None:
                transition = shop.deliver(order, PaymentOutcome(success=True, result_code=0, amount=order.amount,
                                                                receipt=other.receipt))
                assert not transition.changes
        else:  # a success for another amount completes nothing
            transition = shop.deliver(order, PaymentOutcome(success=True, result_code=0, amount=order.amount + 1,
                                                            receipt=receipt_of(order) + "X"))
            assert not transition.changes

        held = sum(o.quantity for o in shop.orders if holds_tickets(o.status))
        assert shop.reserved == held <= shop.capacity  # never oversold, nothing leaked
        for o in shop.orders:
            if o.completed_as is not None:
                assert (o.status, o.receipt) == o.completed_as and not o.refund_due  # a completed order never changes
    for o in shop.orders:
        if o.number in shop.confirmed:
            assert o.status is Status.COMPLETED or o.refund_due, o  # every confirmed success is honoured or owed back
            assert o.receipt == receipt_of(o)
    receipts = [o.receipt for o in shop.orders if o.receipt]
    assert len(receipts) == len(set(receipts))  # one payment, one order
