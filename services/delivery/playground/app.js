// The Kiln playground: one conversation, drawn turn by turn. Plain JS, no build step.
// Talks to delivery's /api (see services/delivery/http.py).
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = { conversation: null, editOf: null, busy: false, csrf: null, textSize: null };

// A POST carries the session's CSRF token (from /api/me); the server refuses one without it.
async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const options = body === undefined ? {} : { method: "POST", headers, body: JSON.stringify(body) };
  return fetch(path, options);
}

// -- sign-in ------------------------------------------------------------------------------

async function start() {
  const response = await fetch("/api/me");
  if (response.status === 401) {
    $("#sign-in-form").hidden = false;
    // An OpenID Connect issuer, where settings name one: a link, as the sign-in is a
    // top-level navigation to the issuer and back.
    const { oidc } = await response.json();
    if (oidc) {
      $("#oidc-start").href = oidc.start;
      $("#oidc-host").textContent = oidc.host;
      $("#oidc").hidden = false;
    }
    return;
  }
  const me = await response.json();
  state.csrf = me.csrf;
  $("#sign-in-form").hidden = true;
  $("#account").hidden = false;
  $("#playground").hidden = false;
  $("#who").textContent = me.user;
  showQuota(me.quota);
  for (const [name, title] of Object.entries(me.styles)) {
    $("#style").append(new Option(title, name));
  }
  // Only the sizes the model draws (its card): another would be refused, or drawn as blobs.
  for (const side of me.sizes) {
    $("#size").append(new Option(`${side}×${side}`, side));
  }
  state.textSize = me.text_size;
  const key = `kiln-conversation-${me.user}`;
  state.conversation = localStorage.getItem(key) || newConversationId();
  localStorage.setItem(key, state.conversation);
  await loadConversation();
}

function newConversationId() {
  return "c-" + crypto.randomUUID().replaceAll("-", "").slice(0, 16);
}

// The form signs in; its "Sign up" button makes the account first (and signs in too).
$("#sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const path = event.submitter && event.submitter.id === "sign-up" ? "/api/signup" : "/api/login";
  const response = await api(path, { user: $("#user").value.trim(), password: $("#password").value });
  if (!response.ok) {
    $("#sign-in-error").textContent = (await response.json()).error;
    $("#sign-in-error").hidden = false;
    return;
  }
  location.reload();
});

$("#sign-out").addEventListener("click", async () => {
  await api("/api/logout", {});
  location.reload();
});

// CLI access: a NATS credential for this user, saved as kiln.creds for `kiln login`.
$("#get-credentials").addEventListener("click", async () => {
  const response = await api("/api/credentials", {});
  const answer = await response.json();
  if (!response.ok) {
    $("#credentials-error").textContent = answer.error;
    $("#credentials-error").hidden = false;
    return;
  }
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([answer.credentials], { type: "application/octet-stream" }));
  link.download = "kiln.creds";
  link.click();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);  // once the download has it
  $("#credentials-expiry").textContent = new Date(answer.expires_at * 1000).toLocaleTimeString();
  $("#login-command").textContent = answer.command;
  $("#credentials-error").hidden = true;
  $("#credentials-done").hidden = false;
});

$("#new-conversation").addEventListener("click", () => {
  state.conversation = newConversationId();
  localStorage.setItem(`kiln-conversation-${$("#who").textContent}`, state.conversation);
  $("#turns").replaceChildren();
  stopEditing();
});

function showQuota(quota) {
  $("#quota").textContent = quota
    ? `${quota.left} of ${quota.limit} images left today (${quota.plan})`
    : "quota unknown";
}

function notice(text) {
  $("#notice").textContent = text || "";
  $("#notice").hidden = !text;
}

// -- the conversation -----------------------------------------------------------------------

async function loadConversation() {
  const response = await fetch(`/api/conversations/${state.conversation}`);
  if (!response.ok) return;
  for (const turn of await response.json()) {
    const card = addTurn(turn.composition ? turn.composition.text : turn.prompt);
    showOutcome(card, turn);
  }
}

function addTurn(text) {
  const card = document.createElement("li");
  card.className = "turn";
  const asked = document.createElement("div");
  asked.className = "asked";
  asked.textContent = text;
  card.append(asked);
  $("#turns").append(card);
  return card;
}

function showOutcome(card, outcome) {
  card.dataset.requestId = outcome.request_id;
  if (outcome.event === "delivered") {
    const drawn = document.createElement("div");
    drawn.className = "drawn";
    drawn.textContent = `drawn: ${outcome.prompt}`;
    const degraded = outcome.composition && outcome.composition.degraded;
    if (degraded) drawn.textContent += ` (drawn with less than asked while Kiln is busy: ${degraded})`;
    const image = document.createElement("img");
    image.src = outcome.image;
    image.alt = outcome.prompt;
    card.append(drawn, image, actions(card, outcome));
  } else if (outcome.event === "pending") {
    const drawn = document.createElement("div");
    drawn.className = "drawn";
    drawn.textContent = "still drawing: reload in a moment";
    card.append(drawn);
  } else if (outcome.event === "denied" || outcome.event === "failed" || outcome.event === "error") {
    // Said once, on the turn it belongs to (not again in the notice above the composer).
    card.classList.add("failed");
    const reason = document.createElement("div");
    reason.className = "reason";
    reason.textContent = explain(outcome);
    card.append(reason);
  }
}

// What a denial means, in words; its detail gives the numbers.
const DENIALS = {
  daily_limit: "You have used all of today’s images",
  rate_limit: "That is more images at once than your plan allows",
  capacity: "Kiln is too busy to draw for your plan just now",
  invalid: "Kiln cannot take this request",
  too_costly: "That image would take longer to draw than your plan allows",
};

// A suggestion written for the CLI ("try --size 32 --steps 20"), in the playground's words.
function inWords(detail) {
  return detail.replace(/--size (\d+)/, "size $1×$1").replace(/--steps (\d+)/, "$1 steps");
}

// The reader's own clock, and which clock it is: "Thu, Nov 26, 7:00 PM EST".
const LOCAL_TIME = new Intl.DateTimeFormat(undefined, {
  weekday: "short", month: "short", day: "numeric", hour: "numeric", minute: "2-digit", timeZoneName: "short",
});

function explain(outcome) {
  if (outcome.event === "denied") {
    const retry = outcome.retry_at ? ` Try again after ${LOCAL_TIME.format(new Date(outcome.retry_at))}.` : "";
    return `${DENIALS[outcome.reason] || "Not drawn"}: ${sentence(inWords(outcome.detail))}${retry}`;
  }
  if (outcome.event === "failed") return `Not drawn: ${sentence(outcome.detail)}`;
  return sentence(outcome.detail);
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

function actions(card, outcome) {
  const bar = document.createElement("div");
  bar.className = "actions";
  const edit = button("Edit", "edit", () => startEditing(outcome));
  const download = document.createElement("a");
  download.className = "download";
  download.textContent = "Download";
  download.href = outcome.url + "&download=1";
  download.download = `kiln-${outcome.request_id}.png`;
  const share = button("Share", "share", async () => {
    const response = await api(`/api/images/${outcome.request_id}/share`, {});
    const link = await response.json();
    let shown = card.querySelector(".share-url");
    if (!shown) {
      shown = document.createElement("a");
      shown.className = "share-url";
      shown.target = "_blank";
      card.append(shown);
    }
    if (response.ok) {
      shown.href = shown.textContent = link.url;
    } else {
      shown.removeAttribute("href");
      shown.textContent = link.error;
    }
  });
  bar.append(edit, download, share);
  if (card.dataset.traceUrl || card.dataset.traceId) bar.append(traceLink(card));
  return bar;
}

function traceLink(card) {
  // A link into the tracing UI when one is configured (KILN_TRACE_URL); else the trace id,
  // to look up by hand.
  const link = document.createElement("a");
  link.className = "trace";
  link.title = `trace ${card.dataset.traceId}`;
  if (card.dataset.traceUrl) {
    link.href = card.dataset.traceUrl;
    link.target = "_blank";
    link.textContent = "Trace";
  } else {
    link.textContent = `trace ${card.dataset.traceId}`;
  }
  return link;
}

function button(text, className, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.className = className;
  element.textContent = text;
  element.addEventListener("click", onClick);
  return element;
}

function startEditing(outcome) {
  state.editOf = outcome.request_id;
  $("#editing-prompt").textContent = `“${outcome.prompt}”`;
  $("#editing").hidden = false;
  $("#prompt").placeholder = "make it blue";
  $("#prompt").focus();
}

function stopEditing() {
  state.editOf = null;
  $("#editing").hidden = true;
  $("#prompt").placeholder = "a red circle on a white background";
}
$("#stop-editing").addEventListener("click", stopEditing);

// -- drawing --------------------------------------------------------------------------------

$("#composer").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (state.busy) return;
  const text = $("#prompt").value.trim();
  if (!text) return;
  state.busy = true;
  $("#send").disabled = true;
  notice("");
  const card = addTurn(text);
  try {
    await draw(card, {
      prompt: text,
      conversation_id: state.conversation,
      style: $("#style").value || null,
      edit_of: state.editOf,
      // Quoted text is drawn by the text model, at its one size.
      size: /["“”][^"“”]*["“”]/.test(text) && state.textSize ? state.textSize : Number($("#size").value),
      steps: Number($("#steps").value),
    });
    $("#prompt").value = "";
    stopEditing();
  } finally {
    state.busy = false;
    $("#send").disabled = false;
    $("#working").hidden = true;
  }
});

async function draw(card, body) {
  setProgress(0, "waiting for quota");
  $("#working").hidden = false;
  const response = await api("/api/generate", body);
  if (!response.ok) {
    showOutcome(card, { event: "error", detail: (await response.json()).error });
    return;
  }
  // One JSON object per line: accepted, progress…, then the outcome and the quota left.
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffered += value;
      const lines = buffered.split("\n");
      buffered = lines.pop();
      for (const line of lines) if (line) handle(card, JSON.parse(line));
    }
  } catch (error) {
    // The connection broke; the request goes on without us.
  }
  if (!card.querySelector("img, .reason")) {
    showOutcome(card, { event: "error", detail: "the connection ended before the image came; reload to see it" });
  }
}

function handle(card, line) {
  switch (line.event) {
    case "accepted":
      card.dataset.requestId = line.request_id;
      card.dataset.traceId = line.trace_id;
      if (line.trace_url) card.dataset.traceUrl = line.trace_url;
      break;
    case "progress":
      if (line.state === "queued") {
        const eta = line.eta_s != null ? `, about ${Math.round(line.eta_s)} s` : "";
        setProgress(0, `queued: #${line.queue_position}${eta}`);
      } else {
        setProgress(line.step / line.total, `rendering ${line.step}/${line.total}`);
      }
      break;
    case "quota":
      showQuota(line.quota);
      break;
    default:
      if (line.event === "delivered") setProgress(1, "done");
      showOutcome(card, line);
  }
}

function setProgress(fraction, text) {
  $("#progress").value = fraction;
  $("#status").textContent = text;
}

start();
