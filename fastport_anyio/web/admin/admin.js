// The admin console page: login, sessions with their live figures, actions, and charts.
// Talks only to /console/* on this origin. The login is an HttpOnly cookie the page never sees; the CSRF
// token the server hands out lives in this module's memory only (never in storage), and the password is
// dropped from the form as soon as it was sent.

const POLL_MS = 1000;
let csrfToken = null;
let pollTimer = null;

const $ = (id) => document.getElementById(id);

function show(id, visible) {
  $(id).classList.toggle("hidden", !visible);
}

async function api(path, body) {
  const init = { credentials: "same-origin", headers: {} };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.headers["X-Fastport-CSRF"] = csrfToken ?? "login";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  let answer = {};
  try {
    answer = await response.json();
  } catch {
    answer = { error: `HTTP ${response.status}` };
  }
  return { status: response.status, answer };
}

function showLogin() {
  stopPolling();
  csrfToken = null;
  show("dashboard", false);
  show("logout", false);
  show("login", true);
}

function showDashboard() {
  show("login", false);
  show("dashboard", true);
  show("logout", true);
  refresh();
  stopPolling();
  pollTimer = setInterval(refresh, POLL_MS);
}

function stopPolling() {
  if (pollTimer !== null) clearInterval(pollTimer);
  pollTimer = null;
}

async function start() {
  const { answer } = await api("/console/status");
  show("loading", false);
  if (!answer.adminEnabled) {
    show("disabled", true);
    return;
  }
  if (answer.loggedIn) {
    csrfToken = answer.csrfToken;
    showDashboard();
  } else {
    showLogin();
  }
}

async function login(event) {
  event.preventDefault();
  const user = $("login-user").value;
  const password = $("login-password").value;
  $("login-password").value = "";
  $("login-error").textContent = "";
  const { status, answer } = await api("/console/login", { user, password });
  if (status === 200 && answer.success) {
    csrfToken = answer.csrfToken;
    showDashboard();
  } else {
    $("login-error").textContent = answer.error ?? `login failed (HTTP ${status})`;
  }
}

async function logout() {
  await api("/console/logout", {});
  showLogin();
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = String(text);
  if (className) td.className = className;
  return td;
}

function button(label, className, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  if (className) b.className = className;
  b.addEventListener("click", onClick);
  return b;
}

function report(id, ok, text) {
  $(id).className = ok ? "ok" : "error";
  $(id).textContent = text;
}

async function act(path, body, done) {
  const { status, answer } = await api(path, body);
  if (status === 401) return showLogin();
  report("action-result", status === 200, status === 200 ? done : answer.error ?? `HTTP ${status}`);
  refresh();
}

function renderSessions(sessions) {
  const rows = sessions.map((s) => {
    const tr = document.createElement("tr");
    tr.dataset.session = s.sessionName;
    tr.append(
      cell(s.sessionName, "name"),
      cell(s.connections, "connections"),
      cell(s.subscribers, "subscribers"),
      cell(s.unackedMessages, "unacked"),
      cell(s.pendingBytes, "pending-bytes"),
      cell(s.publishRate.toFixed(1), "publish-rate"),
      cell(s.deliveryRate.toFixed(1), "delivery-rate"),
      cell(s.publishes, "publishes"),
      cell(s.deliveries, "deliveries"),
      cell(s.givenUp, "given-up"),
      cell(s.suspended ? "suspended" : "active", "state"),
    );
    const actions = document.createElement("td");
    actions.className = "actions";
    const name = s.sessionName;
    const suspend = !s.suspended;
    actions.append(
      button(suspend ? "Suspend" : "Resume", "toggle", () => {
        if (confirm(`${suspend ? "Suspend" : "Resume"} session "${name}"?`)) {
          act("/console/suspendSession", { sessionName: name, suspend }, `session "${name}" ${suspend ? "suspended" : "resumed"}`);
        }
      }),
      button("Drop", "danger drop", () => {
        if (confirm(`Drop session "${name}"? Its connections are closed and its messages are lost.`)) {
          act("/console/dropSession", { sessionName: name }, `session "${name}" dropped`);
        }
      }),
    );
    tr.append(actions);
    return tr;
  });
  $("sessions").replaceChildren(...rows);
  $("session-count").textContent = `(${sessions.length})`;
}

const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  return element;
}

/** Draw ``series`` (arrays of values, oldest first) over the history's time span, in an SVG. */
function drawChart(svg, ages, series, span) {
  const width = 600, height = 180, left = 40, bottom = 16, top = 8;
  const max = Math.max(1, ...series.flat());
  const x = (age) => left + (width - left) * (1 - age / span);
  const y = (value) => top + (height - top - bottom) * (1 - value / max);
  const parts = [
    svgElement("line", { class: "axis", x1: left, y1: y(0), x2: width, y2: y(0) }),
    svgElement("line", { class: "axis", x1: left, y1: y(max), x2: width, y2: y(max) }),
  ];
  const label = (text, attributes) => {
    const t = svgElement("text", { class: "label", ...attributes });
    t.textContent = text;
    return t;
  };
  parts.push(label(max.toFixed(max < 10 ? 1 : 0), { x: 2, y: y(max) + 4 }));
  parts.push(label("0", { x: 2, y: y(0) + 4 }));
  parts.push(label(`-${Math.round(span / 60)} min`, { x: left, y: height - 2 }));
  parts.push(label("now", { x: width - 24, y: height - 2 }));
  series.forEach((values, index) => {
    if (!values.length) return;
    const points = values.map((v, i) => `${x(ages[i]).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
    parts.push(svgElement("polyline", { class: `line-${index}`, points }));
  });
  svg.replaceChildren(...parts);
}

function renderHistory(overview) {
  const history = overview.history;
  const span = overview.sampleInterval * overview.historyLength;
  const ages = history.map((h) => h.age);
  drawChart($("chart-rates"), ages, [
    history.map((h) => h.publishRate),
    history.map((h) => h.deliveryRate),
    history.map((h) => h.givenUpRate),
  ], span);
  drawChart($("chart-connections"), ages, [
    history.map((h) => h.connections),
    history.map((h) => h.subscribers),
    history.map((h) => h.unackedMessages),
  ], span);
  $("history-span").textContent = `(last ${Math.round(span / 60)} minutes, ${history.length} samples)`;
}

async function refresh() {
  const { status, answer } = await api("/console/overview");
  if (status === 401) return showLogin();
  if (status !== 200) return;
  renderSessions(answer.sessions);
  renderHistory(answer);
}

function optionalNumber(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

async function createSession(event) {
  event.preventDefault();
  const body = {
    sessionName: $("create-name").value,
    password: $("create-password").value,
    retryInterval: optionalNumber("create-retry"),
    maxRetryLimit: optionalNumber("create-max-retries"),
    messageExpiryTime: optionalNumber("create-expiry"),
  };
  $("create-password").value = "";
  const { status, answer } = await api("/console/createSession", body);
  if (status === 401) return showLogin();
  const result = $("create-result");
  if (status === 200 && answer.success) {
    result.className = "ok";
    const secret = document.createElement("span");
    secret.className = "secret";
    secret.id = "created-secret";
    secret.textContent = answer.secretKey;
    result.replaceChildren(`Session "${answer.sessionName}" created. Secret key (shown once): `, secret);
    $("create-name").value = "";
    refresh();
  } else {
    report("create-result", false, answer.error ?? `HTTP ${status}`);
  }
}

$("login-form").addEventListener("submit", login);
$("create-form").addEventListener("submit", createSession);
$("logout").addEventListener("click", logout);
start();
