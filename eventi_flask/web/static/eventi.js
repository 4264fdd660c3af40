// Eventi's pages: the checkout form and the payment-status long poll (the ticket link's page needs none).
// One ES module, no build step, no dependencies; the server renders the HTML
// and this only adds behaviour (so it runs under CSP default-src 'self').

const HELD_WAITS_BEFORE_GIVING_UP = 4;
const FINAL_STATUSES = new Set(["completed", "cancelled", "failed"]);
// A held wait that has not answered this long after its hold is presumed lost
// (a mobile network can drop a connection without telling anyone).
const LOST_WAIT_GRACE_SECONDS = 15;
// Reconnecting never waits longer than this: a page waiting through a deploy must show
// the payment within seconds of the server answering again, not half a minute later.
const MAX_RECONNECT_MS = 3000;
// A hold that answers unchanged this much earlier than asked did not run its course
// (an old stopping worker, a proxy): a reconnect, not an attempt.
const HOLD_RAN_ITS_COURSE = 0.9;

// A 503 busy or 429 asking us to come back within this long is sent again by the page itself,
// with the same Idempotency-Key, for up to AUTO_RETRY_FOR_MS; a longer wait is the buyer's to choose.
const AUTO_RETRY_MAX_SECONDS = 30;
const AUTO_RETRY_FOR_MS = 120000;
const BUSY_SENTENCE = "Busy, still trying: many people are buying right now. Please keep this page open.";

const formatKes = (amount) => `KES ${Number(amount).toLocaleString("en-US")}`;
const detailsKey = (slug) => `eventi:checkout:${slug}`;
const REMEMBERED_FIELDS = ["name", "email", "phone"];
// The sales window (salesWindow): its refusals, and how long a timer may aim ahead.
const SALES_WINDOW_CODES = new Set(["sales_not_open", "sales_closed"]);
const LONGEST_TIMER_MS = 60 * 60 * 1000; // re-aim at least hourly: a sleeping laptop's timers run late

// ---------------------------------------------------------------- checkout

const FORM_SENTENCES = {
  network: "We couldn't reach Eventi. Check your internet connection and try again.",
  404: "Sorry, these tickets are no longer on sale.",
  409: "Choose fewer tickets or another ticket type.",
  429: "You've started several payments in the last few minutes. Please wait a few minutes, then try again.",
  502: "We couldn't reach M-Pesa to start the payment. Nothing was charged; please try again in a moment.",
  other: "Something went wrong on our side. Please try again in a moment.",
};

const MPESA_RULE_CODES = new Set(["payment_in_progress", "payment_refused"]);

function startCheckout(form) {
  const slug = form.dataset.event;
  const payButton = form.querySelector("[data-pay]");
  const totalOutput = form.querySelector("[data-total]");
  const formError = form.querySelector("[data-form-error]");
  const formStatus = form.querySelector("[data-form-status]");
  const rules = checkoutRules(form.dataset);
  // The order attempt sent and not yet answered (a network error): pressing Pay again with the
  // same details sends it again with its Idempotency-Key, so that it cannot make a second order.
  let unanswered = null;
  // Fields are checked on submit, then again as they are corrected. Not on blur: a
  // message appearing under a field moves the Pay button away from the pointer mid-click.
  const flagged = new Set();
  const sales = salesWindow(form, () => {
    payButton.disabled = false;
    showTotal();
    line.salesOpened();
  });
  const line = checkoutLine(document.querySelector("[data-line]"), { slug, form, sales, send });

  restoreDetails(form, slug);
  showTotal();
  line.resume(); // a reload while in line asks for the same place

  form.addEventListener("change", (event) => {
    if (event.target.name === "ticket_type") limitQuantity(form);
  });
  form.addEventListener("change", showTotal);
  form.addEventListener("input", (event) => {
    if (flagged.has(event.target.name)) checkField(event.target.name);
  });
  for (const chip of document.querySelectorAll("[data-fill-phone]")) {
    chip.addEventListener("click", () => {
      form.elements.phone.value = chip.dataset.fillPhone;
      checkField("phone");
      form.elements.phone.focus();
    });
  }
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });

  function values() {
    const data = Object.fromEntries(new FormData(form));
    return { ticket_type: data.ticket_type || "", quantity: data.quantity || "", name: data.name || "",
             email: (data.email || "").trim(), phone: data.phone || "" };
  }

  function showTotal() {
    const ticket = form.querySelector("input[name=ticket_type]:checked");
    const total = ticket ? Number(ticket.dataset.price) * Number(form.elements.quantity.value) : 0;
    totalOutput.textContent = formatKes(total);
    payButton.textContent = `Pay ${formatKes(total)} with M-Pesa`;
  }

  function checkField(name) {
    const message = rules[name](values()[name]);
    showFieldError(form, name, message);
    if (message) flagged.add(name);
    return message;
  }

  async function submit() {
    if (!sales.canOrder()) return; // Enter in a field, before the opening minute (or the line's)
    showFormError("");
    saveDetails(form, slug);
    const invalid = Object.keys(rules).filter((name) => checkField(name));
    if (invalid.length) {
      focusField(form, invalid[0]);
      return;
    }
    setBusy(true);
    const order = values();
    const body = JSON.stringify({ event: slug, ...order, quantity: Number(order.quantity) });
    if (!unanswered || unanswered.body !== body) unanswered = { body, key: newIdempotencyKey() };
    await send(unanswered);
  }

  // POST the order attempt {body, key}: 201 goes to the status page, 202 to a place in the line,
  // anything else back to the form with its sentence.
  async function send(attempt) {
    unanswered = attempt;
    try {
      const response = await placeOrder(attempt);
      unanswered = null;
      const answer = await response.json().catch(() => ({}));
      if (response.status === 201) {
        window.location.assign(`/orders/${encodeURIComponent(answer.id)}`);
        return; // stay busy while the status page loads
      }
      if (response.status === 202 && answer.queue) {
        line.join(attempt, answer.queue);
        return;
      }
      line.leave();
      showRefusal(response.status, answer.error || {});
    } catch {
      line.leave();
      showFormError(FORM_SENTENCES.network);
    }
    showStatus("");
    setBusy(false);
  }

  // POST the order; a 503 or 429 that asks us to come back soon is sent again, after Retry-After
  // and a random part of it (buyers turned away together must not come back together).
  async function placeOrder({ body, key }) {
    const started = Date.now();
    for (;;) {
      const response = await fetch("/api/orders", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json", "Idempotency-Key": key },
        body,
      });
      const retryAfter = Number(response.headers.get("Retry-After"));
      const askedBack = (response.status === 503 || response.status === 429) && retryAfter > 0;
      if (!askedBack || retryAfter > AUTO_RETRY_MAX_SECONDS || Date.now() - started > AUTO_RETRY_FOR_MS) return response;
      showStatus(BUSY_SENTENCE);
      payButton.textContent = "Busy, still trying…";
      const delay = retryAfter * 1000 * (1 + Math.random() / 2);
      console.log(`🔁 Busy (HTTP ${response.status}); sending the order again in ${Math.ceil(delay / 1000)}s`);
      await pause(delay);
    }
  }

  function showStatus(message) {
    formStatus.textContent = message;
    formStatus.hidden = !message;
  }

  function showRefusal(status, error) {
    const fields = error.fields || {};
    const onForm = Object.keys(fields).filter((name) => name in rules);
    for (const name of onForm) {
      showFieldError(form, name, fields[name]);
      flagged.add(name);
    }
    if (status === 400 && onForm.length) {
      focusField(form, onForm[0]);
      return;
    }
    // The sales window, and M-Pesa's own rules (a prompt already open on the phone, ...): the API's sentence says it.
    if ((status === 409 && SALES_WINDOW_CODES.has(error.code)) || MPESA_RULE_CODES.has(error.code)) showFormError(error.message);
    else if (status === 409) showFormError(`${error.message || "Not enough tickets are left."} ${FORM_SENTENCES[409]}`);
    // The limiter says which limit was hit (this phone, or this connection): its words are the better ones.
    else if (status === 429) showFormError(error.message || FORM_SENTENCES[429]);
    else showFormError(FORM_SENTENCES[status] || (status === 400 && error.message) || FORM_SENTENCES.other);
  }

  function showFormError(message) {
    formError.textContent = message;
    formError.hidden = !message;
  }

  function setBusy(busy) {
    payButton.disabled = busy || !sales.canOrder();
    form.setAttribute("aria-busy", String(busy));
    if (busy) payButton.textContent = "Sending the M-Pesa prompt…";
    else showTotal();
  }
}

// ---------------------------------------------------------------- the sales window

// Counts down to the opening and watches for the close, on the server's clock (the page says what
// time the server had when it rendered it), so a phone set to the wrong time opens on the minute.
// onOpen() runs once, when sales open with the page still on screen.
function salesWindow(form, onOpen) {
  const offsetMs = Number(form.dataset.serverNowMs) - pageArrivedAt();
  const serverNow = () => Date.now() + offsetMs;
  const opensAt = Number(form.dataset.opensAtMs);
  const closesAt = Number(form.dataset.closesAtMs);
  const lineOpensAt = Number(form.dataset.lineOpensAtMs) || Infinity; // absent: no line before the opening
  const countdowns = document.querySelectorAll("[data-countdown]");
  const payButton = form.querySelector("[data-pay]");
  let state = form.dataset.salesState;

  function show(name) {
    state = name;
    form.dataset.salesState = name;
    for (const notice of form.querySelectorAll("[data-sales-notice]")) notice.hidden = notice.dataset.salesNotice !== name;
    form.querySelector("[data-checkout-fields]").hidden = name === "closed" || name === "sold_out";
  }

  function tick() {
    const now = serverNow();
    if (state === "not_open") {
      const left = opensAt - now;
      if (left > 0) {
        for (const countdown of countdowns) countdown.textContent = formatCountdown(left);
        if (now >= lineOpensAt && payButton.disabled && form.getAttribute("aria-busy") !== "true") payButton.disabled = false;
        setTimeout(tick, Math.min(left, left % 1000 || 1000)); // on each second's edge, and on the opening
        return;
      }
      show("open");
      console.log("🎟️ Sales are open");
      onOpen();
    }
    if (state === "open") {
      const left = closesAt - now;
      if (left > 0) {
        setTimeout(tick, Math.min(left, LONGEST_TIMER_MS));
        return;
      }
      show("closed");
    }
  }

  tick();
  return {
    open: () => state === "open",
    // Pay is taken while sales are open, and before the opening once the line takes arrivals.
    canOrder: () => state === "open" || (state === "not_open" && serverNow() >= lineOpensAt),
    beforeOpening: () => state === "not_open",
  };
}

// ---------------------------------------------------------------- the line

// When more buyers arrive than orders can be served (and before sales open), POST answers 202 with a
// place in the event's line, and the order is made by the server when the place's turn comes.
// The place is kept in this tab (sessionStorage: never in a URL, it carries the buyer's details) with
// the Idempotency-Key and body that took it: a reload asks for the same place, and, should the server
// no longer know it, sends the same key again, which answers the same place or the order it made.
const lineKey = (slug) => `eventi:line:${slug}`;
// "Your turn" stays on screen (and is read out) this long before the status page takes over.
const ADMITTED_PAUSE_MS = 1500;
// A screen reader hears the place again at most this often; a change of state is said at once.
const LINE_ANNOUNCE_EVERY_MS = 30000;

function checkoutLine(card, { slug, form, sales, send }) {
  const holdSeconds = Number(card.dataset.holdSeconds);
  const states = card.querySelectorAll("[data-line-state]");
  const slot = (name) => card.querySelector(`[data-line-${name}]`);
  let entry = null; // {id, key, body}: this tab's place
  let shown = null; // the place on screen
  let announcedAt = 0;

  for (const button of card.querySelectorAll("[data-line-action=form]")) button.addEventListener("click", backToForm);
  card.querySelector("[data-line-action=rejoin]").addEventListener("click", () => {
    show("queued");
    slot("place").textContent = "Joining the line…";
    send({ body: entry.body, key: newIdempotencyKey() }); // a new place: the old key answers the old one
  });

  function show(name) {
    for (const state of states) state.hidden = state.dataset.lineState !== name;
    form.hidden = true;
    card.hidden = false;
  }

  function keep(value) {
    entry = value;
    try {
      sessionStorage.setItem(lineKey(slug), JSON.stringify(value));
    } catch {
      // Private modes may refuse storage: the place holds while the page stays open.
    }
  }

  // The place is over (its turn came, or it cannot be served): a reload shows the form. The entry
  // stays in memory for "Join the line again" and "Back to the form".
  function forget() {
    try {
      sessionStorage.removeItem(lineKey(slug));
    } catch {
      // nothing was kept
    }
  }

  function kept() {
    try {
      const value = JSON.parse(sessionStorage.getItem(lineKey(slug)) || "null");
      return value && typeof value.id === "string" && typeof value.key === "string" && typeof value.body === "string"
        ? value : null;
    } catch {
      return null;
    }
  }

  // Back to the form, as the server now renders it (what is left to buy, the sales window), with the
  // same tickets chosen; the buyer's details come back from sessionStorage.
  function backToForm() {
    forget();
    const { ticket_type: ticketType, quantity } = JSON.parse(entry.body);
    window.location.assign(`${window.location.pathname}?${new URLSearchParams({ ticket_type: ticketType, quantity })}`);
  }

  function render(place) {
    shown = place;
    if (place.status !== "queued") return;
    const beforeOpening = sales.beforeOpening();
    slot("pre-queue").hidden = !beforeOpening;
    // Before the opening the order is not drawn yet: a count of people ahead would mean nothing.
    const sentence = beforeOpening ? "You have a place for the opening." : placeSentence(place);
    slot("place").textContent = sentence;
    if (Date.now() - announcedAt > LINE_ANNOUNCE_EVERY_MS) {
      slot("announce").textContent = `You are in line. ${sentence}`;
      announcedAt = Date.now();
    }
  }

  function finish(place) {
    forget();
    if (place.status === "admitted" && place.order) {
      show("admitted");
      console.log(`📱 Your turn: order ${place.order.id} made, the M-Pesa prompt is on its way`);
      setTimeout(() => window.location.assign(`/orders/${encodeURIComponent(place.order.id)}`), ADMITTED_PAUSE_MS);
      return;
    }
    if (place.status === "refused" || place.status === "admitted") { // admitted without its order: not one we can show
      slot("reason").textContent = (place.error && place.error.message) || FORM_SENTENCES.other;
      show("refused");
      return;
    }
    show(place.status); // sold_out, left
  }

  async function follow(place) {
    const settled = (answer) => {
      render(answer);
      if (answer.status === "queued") return false;
      console.log(`🧍 Place in line ${answer.id}: ${answer.status}`);
      finish(answer);
      return true;
    };
    if (place.ahead !== undefined && settled(place)) return; // a resumed place has none yet: the first wait tells it
    // The server paces the answers (every second near the front, less often far back): each is asked again at once.
    const outcome = await holdWaits({
      pathFor: (version) => `/api/queue/${encodeURIComponent(place.id)}/wait?timeout=${holdSeconds}${version < 0 ? "" : `&since=${version}`}`,
      holdSeconds,
      version: place.version,
      onConnection: connection,
      settled,
    });
    if (outcome === SETTLED) return;
    if (outcome.status === 404) {
      // The server no longer knows the place (a line kept in a process that restarted): the same
      // key asks for it again.
      console.warn("🧍 The line does not know this place; asking again with the same Idempotency-Key");
      send({ body: entry.body, key: entry.key });
      return;
    }
    finish({ status: "refused", error: null });
  }

  function connection(message) {
    slot("connection").textContent = message;
    slot("connection").hidden = !message;
  }

  return {
    // POST answered 202: the place `queue`, taken with `attempt` ({body, key}).
    join(attempt, queue) {
      keep({ id: queue.id, key: attempt.key, body: attempt.body });
      show("queued");
      console.log(`🧍 In line: ${queue.ahead} ahead, about ${queue.estimated_wait_s}s`);
      follow({ ...queue, status: "queued" });
    },
    // A reload: the place this tab had, asked for without `since` (answered at once).
    resume() {
      const place = kept();
      if (!place) return;
      entry = place;
      show("queued");
      follow({ id: place.id, status: "queued", version: -1 });
    },
    // The form again (a refusal, a network error): whatever place this tab had is over.
    leave() {
      if (card.hidden) return;
      forget();
      card.hidden = true;
      form.hidden = false;
    },
    salesOpened() {
      if (shown && !card.hidden) render(shown);
    },
  };
}

// "1,234 ahead of you, about 3 minutes to wait." The estimate is the server's, rounded to what a person
// can use: tens of seconds, then minutes, then 5 minutes past the hour.
function placeSentence({ ahead, estimated_wait_s: seconds }) {
  const people = ahead > 0 ? `${Number(ahead).toLocaleString("en-US")} ahead of you` : "You're next";
  return `${people}, ${aboutWait(seconds)} to wait.`;
}

function aboutWait(seconds) {
  if (seconds < 10) return "less than 10 seconds";
  if (seconds < 55) return `about ${Math.round(seconds / 10) * 10} seconds`;
  const minutes = Math.max(1, Math.round(seconds / 60));
  if (minutes < 60) return `about ${minutes} minute${minutes === 1 ? "" : "s"}`;
  const fives = Math.round(minutes / 5) * 5;
  const hours = Math.floor(fives / 60);
  const rest = fives % 60;
  return `about ${hours} hour${hours === 1 ? "" : "s"}${rest ? ` ${rest} minutes` : ""}`;
}

// When this page's response arrived, on the phone's clock (Date.now's, whatever time it is set to):
// the moment the server's time in the page was true.
function pageArrivedAt() {
  const [navigation] = performance.getEntriesByType("navigation");
  const sinceArrival = navigation && navigation.responseStart ? performance.now() - navigation.responseStart : 0;
  return Date.now() - sinceArrival;
}

function formatCountdown(ms) {
  const seconds = Math.ceil(ms / 1000);
  const days = Math.floor(seconds / 86400);
  const clock = [Math.floor(seconds / 3600) % 24, Math.floor(seconds / 60) % 60, seconds % 60]
    .map((n) => String(n).padStart(2, "0")).join(":");
  return days ? `${days} day${days === 1 ? "" : "s"} ${clock}` : clock;
}

// The quantity picker offers no more than the chosen type's max_per_order.
function limitQuantity(form) {
  const ticket = form.querySelector("input[name=ticket_type]:checked");
  const most = ticket ? Number(ticket.dataset.maxPerOrder) : 10;
  const picker = form.elements.quantity;
  for (const option of picker.options) option.disabled = option.hidden = Number(option.value) > most;
  if (Number(picker.value) > most) picker.value = String(most);
}

function newIdempotencyKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // randomUUID needs a secure context (HTTPS); 128 random bits will do as well.
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (byte) => byte.toString(16).padStart(2, "0")).join("");
}

// The API's own rules, checked before anything is sent (see POST /api/orders).
function checkoutRules({ phonePattern, phoneSeparators, phoneMessage }) {
  const phone = new RegExp(phonePattern);
  const separators = new RegExp(phoneSeparators, "g");
  const email = /^[^\s@]+@[^\s@]+\.[^\s@]+$/;
  return {
    ticket_type: (value) => (value ? "" : "Choose a ticket type."),
    quantity: (value) => (/^([1-9]|10)$/.test(value) ? "" : "Choose between 1 and 10 tickets."),
    name: (value) => (!value.trim() ? "Enter your name." : value.length > 200 ? "Enter your name (up to 200 characters)." : ""),
    email: (value) => (email.test(value) && value.length <= 254 ? "" : "Enter a valid email address."),
    phone: (value) => (phone.test(value.replace(separators, "")) ? "" : phoneMessage),
  };
}

function showFieldError(form, name, message) {
  const error = form.querySelector(`[data-error-for="${name}"]`);
  error.textContent = message;
  error.hidden = !message;
  for (const input of form.querySelectorAll(`[name="${name}"]`)) input.setAttribute("aria-invalid", String(Boolean(message)));
  form.querySelector(`[data-field="${name}"]`).classList.toggle("has-error", Boolean(message));
}

function focusField(form, name) {
  const input = form.querySelector(`[name="${name}"]:checked`) || form.querySelector(`[name="${name}"]`);
  input.focus();
}

// Name, email and phone stay in this tab only (never in a URL), so "Try again" can refill them.
function saveDetails(form, slug) {
  const details = Object.fromEntries(REMEMBERED_FIELDS.map((name) => [name, form.elements[name].value]));
  try {
    sessionStorage.setItem(detailsKey(slug), JSON.stringify(details));
  } catch {
    // Private modes may refuse storage; the form still works, it just won't refill.
  }
}

function restoreDetails(form, slug) {
  let details = {};
  try {
    details = JSON.parse(sessionStorage.getItem(detailsKey(slug)) || "{}");
  } catch {
    return;
  }
  for (const name of REMEMBERED_FIELDS) {
    if (typeof details[name] === "string" && !form.elements[name].value) form.elements[name].value = details[name];
  }
}

// ---------------------------------------------------------------- payment status

function startStatusPage(root) {
  const view = statusView(root, JSON.parse(root.dataset.reasons));
  const holdSeconds = Number(root.dataset.holdSeconds);
  let order = JSON.parse(root.dataset.order);
  let polling = false;

  root.querySelector("[data-action=check-again]").addEventListener("click", () => {
    view.show("pending");
    longPoll();
  });

  if (FINAL_STATUSES.has(order.status)) resolved();
  else longPoll(); // also what a reload does: the page is rendered fresh, and the wait resumes

  function resolved() {
    console.log(`✅ Payment status resolved! Final status: ${order.status}`);
    view.render(order);
    if (order.status === "completed") showTicketQrCodes(root);
  }

  async function longPoll() {
    if (polling) return;
    polling = true;
    try {
      const outcome = await holdWaits({
        pathFor: (version) => `/api/orders/${encodeURIComponent(order.id)}/wait?timeout=${holdSeconds}&since=${version}`,
        holdSeconds,
        version: order.version,
        attempts: HELD_WAITS_BEFORE_GIVING_UP,
        onAttempt(attempt) {
          view.attempt(attempt);
          console.log(`⏳ Long polling attempt ${attempt}/${HELD_WAITS_BEFORE_GIVING_UP} - Waiting for payment...`);
        },
        onConnection: view.connection,
        settled(answer) {
          console.log(`📊 Order status received: ${JSON.stringify(answer)}`);
          order = answer;
          if (!FINAL_STATUSES.has(order.status)) return false;
          resolved();
          return true;
        },
      });
      if (outcome !== SETTLED) view.show("still-waiting");
    } finally {
      polling = false;
    }
  }
}

// ---------------------------------------------------------------- held waits (the order's and the line's)

const SETTLED = "settled";

// One held request at a time, asked again with since=<the last version> until settled(answer) says
// it is over. Only a hold that ran its course with no change is an attempt (the status page gives up
// after a few); a network error, a 429/5xx (a worker stopping for a deploy, a busy database) or an
// early unchanged answer is a reconnect, with backoff, and is not an attempt. Resolves to SETTLED,
// "gave up" after `attempts`, or the WaitFailed that no retry would mend (a 404).
async function holdWaits({ pathFor, holdSeconds, version, settled, attempts = Infinity, onAttempt = () => {}, onConnection }) {
  let attempt = 1;
  let reconnects = 0;
  while (attempt <= attempts) {
    onAttempt(attempt);
    const askedAt = Date.now();
    let answer;
    try {
      answer = await heldWait(pathFor(version), holdSeconds);
    } catch (error) {
      if (!error.retryable) return error;
      reconnects += 1;
      const delay = reconnectDelay(reconnects, error.retryAfterMs);
      console.warn(`🔌 Could not reach the server (${error.message}); retrying in ${Math.ceil(delay / 1000)}s`);
      onConnection(`Connection problem: trying again in ${Math.ceil(delay / 1000)} seconds…`);
      await pause(delay);
      continue;
    }
    const changed = answer.version > version;
    const early = Date.now() - askedAt < holdSeconds * 1000 * HOLD_RAN_ITS_COURSE;
    version = answer.version;
    if (await settled(answer)) return SETTLED;
    if (!changed && early) {
      reconnects += 1;
      const delay = reconnectDelay(reconnects, 0);
      console.warn(`🔁 Answered before the hold ran its course; asking again in ${Math.ceil(delay / 1000)}s`);
      await pause(delay);
      continue;
    }
    reconnects = 0;
    onConnection("");
    if (!changed) attempt += 1;
  }
  return "gave up";
}

class WaitFailed extends Error {
  constructor(message, { retryable = true, retryAfterMs = 0, status = 0 } = {}) {
    super(message);
    this.status = status;
    this.retryable = retryable;
    this.retryAfterMs = retryAfterMs;
  }
}

async function heldWait(url, holdSeconds) {
  const lost = new AbortController();
  const timer = setTimeout(() => lost.abort(), (holdSeconds + LOST_WAIT_GRACE_SECONDS) * 1000);
  try {
    const response = await fetch(url, { cache: "no-store", headers: { Accept: "application/json" }, signal: lost.signal });
    if (response.ok) return await response.json();
    const retryAfterMs = Number(response.headers.get("Retry-After")) * 1000 || 0;
    // 429/5xx are the server or a proxy asking us to come back later; other 4xx won't get better.
    const retryable = response.status === 429 || response.status >= 500;
    throw new WaitFailed(`HTTP ${response.status}`, { retryable, retryAfterMs, status: response.status });
  } catch (error) {
    if (error instanceof WaitFailed) throw error;
    throw new WaitFailed(lost.signal.aborted ? "no answer in time" : error.message);
  } finally {
    clearTimeout(timer);
  }
}

// Doubling from 250 ms, at least the server's Retry-After, never past MAX_RECONNECT_MS;
// jitter (up to half again) so that the pages a deploy dropped together do not come back together.
function reconnectDelay(reconnects, retryAfterMs) {
  const base = Math.min(MAX_RECONNECT_MS / 1.5, Math.max(250 * 2 ** (reconnects - 1), retryAfterMs));
  return Math.round(base * (1 + Math.random() / 2));
}

// Sleep, but wake early when the browser says the network is back.
function pause(ms) {
  return new Promise((resolve) => {
    const wake = () => {
      clearTimeout(timer);
      window.removeEventListener("online", wake);
      resolve();
    };
    const timer = setTimeout(wake, ms);
    window.addEventListener("online", wake);
  });
}

// Tickets that arrived with the long poll are shown as codes at once; their QR codes (inline SVG,
// drawn by the server) follow from the status page itself, as a reload would show them.
async function showTicketQrCodes(root) {
  const lists = root.querySelectorAll("[data-slot=tickets]");
  if (!lists.length || [...lists].every((list) => list.querySelector("svg"))) return;
  try {
    const response = await fetch(window.location.pathname, { cache: "no-store", headers: { Accept: "text/html" } });
    if (!response.ok) return;
    const page = new DOMParser().parseFromString(await response.text(), "text/html");
    const drawn = page.querySelector("[data-slot=tickets]");
    if (!drawn || !drawn.querySelector("svg")) return;
    for (const list of lists) list.replaceChildren(...[...drawn.children].map((item) => document.importNode(item, true)));
  } catch {
    // The codes are already on screen; a reload brings the QR codes.
  }
}

function statusView(root, reasons) {
  const states = root.querySelectorAll("[data-state]");
  const titles = Object.fromEntries([...states].map((state) => [state.dataset.state, state.querySelector("h1").textContent]));
  const slots = (name) => root.querySelectorAll(`[data-slot="${name}"]`);
  const fill = (name, text) => slots(name).forEach((slot) => { slot.textContent = text; });

  function show(name) {
    for (const state of states) state.hidden = state.dataset.state !== name;
    document.title = `${titles[name]} · Eventi`;
  }

  function reasonFor(payment) {
    return reasons.codes[String(payment.result_code)] || payment.result_desc || reasons.fallback;
  }

  // "Try again" brings M-Pesa's rule along, so that the checkout can repeat what to do first.
  function pointTryAgain(payment) {
    for (const link of root.querySelectorAll("a[data-try-again]")) {
      const url = new URL(link.href);
      if (reasons.advice_on_retry.includes(String(payment.result_code))) url.searchParams.set("after", payment.result_code);
      else url.searchParams.delete("after");
      link.href = url.href;
    }
  }

  return {
    show,
    attempt: (n) => fill("attempt", String(n)),
    connection(message) {
      fill("connection", message);
      slots("connection").forEach((slot) => { slot.hidden = !message; });
    },
    render(order) {
      if (order.status === "completed") {
        fill("receipt", order.payment.receipt || "");
        fill("amount", formatKes(order.amount));
        fill("tickets-url", order.tickets_url || "");
        slots("tickets-url").forEach((link) => { link.href = order.tickets_url || ""; });
        for (const list of slots("tickets")) {
          list.replaceChildren(...(order.tickets || []).map((ticket) => {
            const item = document.createElement("li");
            item.className = "code";
            item.textContent = ticket.code;
            return item;
          }));
        }
      } else if (order.payment.refund_due) {
        fill("refund-receipt", order.payment.receipt || "");
        fill("refund-amount", formatKes(order.amount));
        show("refund-due");
        return;
      } else if (order.status !== "pending") {
        fill("reason", reasonFor(order.payment));
        pointTryAgain(order.payment);
      }
      show(order.status);
    },
  };
}

// Last, once every constant above is set (a module's `const`s do not exist before their line runs).
if (document.body.dataset.page === "checkout") startCheckout(document.querySelector("form[data-checkout]"));
if (document.body.dataset.page === "order") startStatusPage(document.querySelector("[data-order]"));
