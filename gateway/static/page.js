"use strict";
// Talks to the service's WebSocket (/ws): {"type":"prompt","messages":[...],...} and {"type":"cancel"} out;
// start/token/end/error messages in. The page holds the conversation and sends all of it with each question.
// A service started with API keys refuses the WebSocket without one: the page then asks for the key, keeps it in
// this tab's sessionStorage (gone when the tab closes, never shared with other tabs) and sends it as ?api_key=.
const $ = (id) => document.getElementById(id);
const promptBox = $("prompt"), systemBox = $("system"), temperatureBox = $("temperature"), maxTokens = $("max-tokens");
const sendButton = $("send"), stopButton = $("stop"), newChatButton = $("new-chat");
const conversationView = $("conversation"), statusLine = $("status");
const keyForm = $("key-form"), keyBox = $("api-key"), keyMessage = $("key-message"), keySubmit = $("key-submit");
const KEY_STORAGE = "llm-api-key";
let apiKey = sessionStorage.getItem(KEY_STORAGE) || "";
let socket = null, running = false;
let turns = [];          // the conversation so far: {role, content}, without the system prompt
let pending = null;      // the question being answered and its answer's element, text and timings

// Model output is untrusted: markdown becomes HTML through marked, and only what DOMPurify keeps reaches the DOM.
function renderMarkdown(text) {
  return DOMPurify.sanitize(marked.parse(text, {gfm: true, breaks: true})).trim();
}
window.renderMarkdown = renderMarkdown;  // tests feed the renderer directly

function setRunning(value) {
  running = value;
  sendButton.disabled = value || !socket || socket.readyState !== WebSocket.OPEN;
  stopButton.disabled = !value;
  newChatButton.disabled = value;
  document.body.dataset.state = value ? "running" : "idle";
}

function addTurn(role, text) {
  const element = document.createElement("div");
  element.className = `turn ${role}`;
  element.textContent = text;  // a user's text is shown as typed, never as HTML
  conversationView.appendChild(element);
  element.scrollIntoView({block: "end"});
  return element;
}

function showAnswer() {
  pending.element.innerHTML = renderMarkdown(pending.text);
  pending.element.scrollIntoView({block: "end"});
}

function finish(statusText, statsText) {
  if (statsText) {
    const stats = document.createElement("div");
    stats.className = "stats";
    stats.textContent = statsText;
    conversationView.appendChild(stats);
  }
  statusLine.textContent = statusText;
  pending = null;
  setRunning(false);
}

function onMessage(message) {
  if (!pending) return;
  if (message.type === "start") {
    statusLine.textContent = "waiting for the first token…";
  } else if (message.type === "token") {
    if (pending.firstTokenAt === null) pending.firstTokenAt = performance.now();
    pending.tokens += 1;
    pending.text += message.text;
    showAnswer();
    statusLine.textContent = `generating… ${pending.tokens} tokens`;
  } else if (message.type === "end") {
    const text = message.text !== undefined ? message.text : pending.text;
    if (text !== pending.text) { pending.text = text; showAnswer(); }
    turns.push({role: "user", content: pending.question}, {role: "assistant", content: pending.text});
    const tokens = (message.usage && message.usage.completion_tokens) || pending.tokens;
    const now = performance.now();
    const ttft = pending.firstTokenAt === null ? null : (pending.firstTokenAt - pending.sentAt) / 1000;
    const decoding = pending.firstTokenAt === null ? 0 : (now - pending.firstTokenAt) / 1000;
    const rate = tokens > 1 && decoding > 0 ? ((tokens - 1) / decoding).toFixed(1) : "–";
    const why = message.finish_reason === "cancelled" ? "stopped" : `done (${message.finish_reason})`;
    const ttftText = ttft === null ? "no token" : `first token ${Math.round(ttft * 1000)} ms`;
    finish(why, `${tokens} tokens · ${ttftText} · ${rate} tokens/s`);
  } else if (message.type === "error") {
    pending.element.classList.add("error");
    pending.element.textContent = message.message;
    finish("error", null);  // the question is not kept: the next one goes without it
  }
}

// A browser's WebSocket does not tell why a handshake failed: an API route does, with a 401 for a missing or
// wrong key (any other answer, or none, means the service is away: reconnect).
async function keyRefused() {
  try {
    const response = await fetch("/v1/models", {headers: apiKey ? {Authorization: `Bearer ${apiKey}`} : {}});
    return response.status === 401;
  } catch (error) {
    return false;
  }
}

function askForKey() {
  keyMessage.textContent = apiKey
    ? "The service refused this API key: check it and enter it again."
    : "This service needs an API key: enter it to chat.";
  apiKey = "";
  sessionStorage.removeItem(KEY_STORAGE);
  keyBox.value = "";
  keySubmit.disabled = false;
  keyForm.hidden = false;
  keyBox.focus();
  statusLine.textContent = "API key needed";
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const query = apiKey ? `?api_key=${encodeURIComponent(apiKey)}` : "";
  let opened = false;
  socket = new WebSocket(`${scheme}://${location.host}/ws${query}`);
  socket.onopen = () => {
    opened = true;
    keyForm.hidden = true;
    statusLine.textContent = "ready";
    setRunning(false);
  };
  socket.onclose = async () => {
    if (pending) finish("disconnected", null);
    setRunning(false);
    sendButton.disabled = true;
    if (!opened && await keyRefused()) {
      askForKey();
      return;
    }
    statusLine.textContent = "disconnected, reconnecting…";
    setTimeout(connect, 1000);
  };
  socket.onmessage = (event) => onMessage(JSON.parse(event.data));
}

function send() {
  const question = promptBox.value.trim();
  if (!question || running || !socket || socket.readyState !== WebSocket.OPEN) return;
  const system = systemBox.value.trim();
  const messages = [...(system ? [{role: "system", content: system}] : []), ...turns, {role: "user", content: question}];
  const request = {type: "prompt", messages, max_tokens: Math.max(1, parseInt(maxTokens.value, 10) || 256)};
  const temperature = parseFloat(temperatureBox.value);
  if (temperature > 0) request.temperature = temperature;
  addTurn("user", question);
  pending = {question, element: addTurn("assistant", ""), text: "", tokens: 0, sentAt: performance.now(),
             firstTokenAt: null};
  pending.element.id = "answer";  // the latest answer
  const previous = document.querySelectorAll("#answer");
  previous.forEach((element) => { if (element !== pending.element) element.removeAttribute("id"); });
  promptBox.value = "";
  setRunning(true);
  statusLine.textContent = "waiting for the first token…";
  socket.send(JSON.stringify(request));
}

sendButton.addEventListener("click", send);
stopButton.addEventListener("click", () => { if (running) socket.send(JSON.stringify({type: "cancel"})); });
newChatButton.addEventListener("click", () => {
  turns = [];
  conversationView.replaceChildren();
  statusLine.textContent = "ready";
});
keyForm.addEventListener("submit", (event) => {
  event.preventDefault();  // the key goes to the WebSocket, never into a URL the page navigates to
  apiKey = keyBox.value.trim();
  if (!apiKey) return;
  sessionStorage.setItem(KEY_STORAGE, apiKey);
  keyMessage.textContent = "checking the key…";
  keySubmit.disabled = true;  // one check at a time
  connect();
});
promptBox.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
});
connect();
