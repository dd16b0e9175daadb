// The playground: stream a completion, or chat turn by turn, into the page; show the speed and the server's figures.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;
let chatMode = false;
const messages = [];  // the conversation so far: {role, content}, the system message not included

function params() {
  const body = { model: $("model").textContent, stream: true,
                 stream_options: { include_usage: true } };  // the last event counts the tokens
  for (const key of ["max_tokens", "top_k", "seed"]) {
    if ($(key).value !== "") body[key] = parseInt($(key).value, 10);
  }
  for (const key of ["temperature", "top_p", "min_p", "repetition_penalty"]) {
    body[key] = parseFloat($(key).value);
  }
  if ($("stop").value) body.stop = [$("stop").value];
  return body;
}

// Server-sent events arrive in arbitrary pieces: split on the blank line that ends each event.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (event.startsWith("data: ")) yield event.slice(6);
    }
  }
}

// POST body to url and hand each choice's new text to onText; true once the stream ended ([DONE]).
async function stream(url, body, onText) {
  $("error").textContent = "";
  controller = new AbortController();
  $("generate").disabled = true;
  $("stop_button").disabled = false;
  const start = performance.now();
  let first = null, chunks = 0, tokens = null, finish = null;
  try {
    const response = await fetch(url, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const err = await response.json();
      throw new Error(err.error ? err.error.message : response.statusText);
    }
    for await (const data of events(response)) {
      if (data === "[DONE]") return true;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices) {
        onText(choice.text !== undefined ? choice.text : (choice.delta.content || ""));
        chunks += 1;
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      if (first === null) first = performance.now();
      const secs = (performance.now() - start) / 1000;
      const count = tokens === null ? `${chunks} chunks` : `${tokens} tokens, ${(tokens / secs).toFixed(1)} tokens/s`;
      $("gen_stats").textContent = `${count}, first after ${(first - start).toFixed(0)} ms` +
        (finish ? `, finish: ${finish}` : "");
    }
  } catch (e) {
    if (e.name !== "AbortError") $("error").textContent = "error: " + e.message;
  } finally {
    $("generate").disabled = false;
    $("stop_button").disabled = true;
    controller = null;
  }
  return false;
}

async function complete() {
  const body = { ...params(), prompt: $("prompt").value };
  $("output").innerHTML = "";
  const promptSpan = document.createElement("span");
  promptSpan.className = "prompt";
  promptSpan.textContent = body.prompt;
  const textSpan = document.createElement("span");
  textSpan.id = "completion";
  $("output").append(promptSpan, textSpan);
  await stream("/v1/completions", body, (text) => { textSpan.textContent += text; });
}

function addTurn(role, text) {
  const turn = document.createElement("div");
  turn.className = `turn ${role}`;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  turn.append(label, content);
  $("turns").append(turn);
  return content;
}

// One turn: the user's message, then the reply streamed into its own box. A reply that fails or is stopped
// is taken back with its message, so the conversation sent next time holds only answered turns.
async function chat() {
  const text = $("message").value;
  if (!text.trim()) return;
  $("message").value = "";
  const system = $("system").value ? [{ role: "system", content: $("system").value }] : [];
  messages.push({ role: "user", content: text });
  const userBox = addTurn("user", text);
  const replyBox = addTurn("assistant", "");
  const done = await stream("/v1/chat/completions", { ...params(), messages: [...system, ...messages] },
                            (piece) => { replyBox.textContent += piece; });
  if (done) {
    messages.push({ role: "assistant", content: replyBox.textContent });
  } else {
    messages.pop();
    userBox.parentElement.remove();
    replyBox.parentElement.remove();
    $("message").value = text;
  }
}

function setMode(chat) {
  chatMode = chat;
  $("mode_chat").setAttribute("aria-pressed", String(chat));
  $("mode_completion").setAttribute("aria-pressed", String(!chat));
  $("chat_view").hidden = $("new_chat").hidden = !chat;
  $("completion_view").hidden = $("output").hidden = chat;
  $("generate").textContent = chat ? "Send" : "Generate";
}

// /metrics is Prometheus text: "name value" lines; pick the few the page shows.
async function refreshStats() {
  try {
    const text = await (await fetch("/metrics")).text();
    const m = {};
    for (const line of text.split("\n")) {
      if (line && !line.startsWith("#")) {
        const [name, value] = line.split(" ");
        m[name.replace("smallllm_", "")] = parseFloat(value);
      }
    }
    const batch = m.decode_steps_total ? (m.decode_tokens_total / m.decode_steps_total).toFixed(2) : "-";
    $("server_stats").textContent = `${m.requests_running} running, ${m.requests_waiting} waiting, ` +
      `KV blocks ${m.kv_blocks_used}/${m.kv_blocks_total}, ${m.generation_tokens_total} tokens generated, ` +
      `mean decode batch ${batch}, prefix-cache hit rate ${(100 * m.prefix_cache_hit_rate).toFixed(0)}%`;
  } catch (e) {
    $("server_stats").textContent = "unreachable";
  }
}

async function init() {
  const models = await (await fetch("/v1/models")).json();
  $("model").textContent = models.data[0].id;
  $("generate").addEventListener("click", () => (chatMode ? chat() : complete()));
  $("stop_button").addEventListener("click", () => controller && controller.abort());
  $("mode_chat").addEventListener("click", () => setMode(true));
  $("mode_completion").addEventListener("click", () => setMode(false));
  $("new_chat").addEventListener("click", () => { messages.length = 0; $("turns").innerHTML = ""; });
  $("message").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      if (!controller) chat();
    }
  });
  refreshStats();
  setInterval(refreshStats, 1000);
}

init();
