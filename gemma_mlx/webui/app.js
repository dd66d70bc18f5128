// The chat page of `gemma-mlx serve`: talks to this server's /v1/chat/completions (streamed) and
// keeps conversations, settings and the API key in this browser's localStorage. Nothing is sent
// anywhere else (the server's Content-Security-Policy enforces it).
"use strict";

const $ = (sel) => document.querySelector(sel);
const STORE = { convs: "gemma-mlx.conversations", current: "gemma-mlx.current", settings: "gemma-mlx.settings", key: "gemma-mlx.key" };
const RATE = 16000; // the model hears 16 kHz mono

const state = {
  convs: [],
  current: null,
  settings: { temperature: "", top_p: "", max_tokens: "", system: "", tools: "", thinking: false },
  key: localStorage.getItem(STORE.key) || "",
  model: null,
  controller: null, // the request in flight
  pending: [], // attachments of the message being written: {kind, url, name}
  recorder: null,
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(text, cls, onClick, title) {
  const b = el("button", cls, text);
  b.type = "button";
  if (title) b.title = title;
  b.addEventListener("click", onClick);
  return b;
}

// --- storage ------------------------------------------------------------------------------------

function load() {
  try {
    state.convs = JSON.parse(localStorage.getItem(STORE.convs) || "[]");
    Object.assign(state.settings, JSON.parse(localStorage.getItem(STORE.settings) || "{}"));
  } catch {
    state.convs = [];
  }
  state.current = localStorage.getItem(STORE.current);
  if (!state.convs.some((c) => c.id === state.current)) state.current = state.convs[0]?.id ?? null;
}

function save() {
  try {
    localStorage.setItem(STORE.convs, JSON.stringify(state.convs));
  } catch {
    // over the browser's quota (media are large): keep the text, drop stored media
    const light = state.convs.map((c) => ({
      ...c,
      messages: c.messages.map((m) => (m.attachments ? { ...m, attachments: m.attachments.map((a) => ({ kind: a.kind, name: a.name, dropped: true })) } : m)),
    }));
    try {
      localStorage.setItem(STORE.convs, JSON.stringify(light));
      notice("Browser storage is full: attachments of saved conversations were not kept.");
    } catch {
      notice("Browser storage is full: conversations could not be saved.");
    }
  }
  if (state.current) localStorage.setItem(STORE.current, state.current);
  else localStorage.removeItem(STORE.current);
}

function saveSettings() {
  localStorage.setItem(STORE.settings, JSON.stringify(state.settings));
}

const conv = () => state.convs.find((c) => c.id === state.current) || null;

function newConversation() {
  // crypto.randomUUID exists only in secure contexts (not on http://LAN-ADDRESS)
  const id = crypto.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
  const c = { id, title: "New chat", created: Date.now(), messages: [] };
  state.convs.unshift(c);
  state.current = c.id;
  save();
  return c;
}

// --- the conversation list ----------------------------------------------------------------------

function renderList() {
  const ul = $("#conversations");
  ul.replaceChildren();
  for (const c of state.convs) {
    const li = el("li", c.id === state.current ? "active" : "");
    li.dataset.id = c.id;
    const open = button(c.title, "conv-title", () => {
      if (state.controller) return;
      state.current = c.id;
      save();
      render();
      document.body.classList.remove("show-sidebar");
    });
    li.append(
      open,
      button("✎", "icon rename", () => rename(li, c), "Rename"),
      button("⤓", "icon export", () => exportConversation(c), "Export as JSON"),
      button("✕", "icon delete", () => remove(c), "Delete"),
    );
    ul.append(li);
  }
}

function rename(li, c) {
  const input = el("input", "rename-input");
  input.value = c.title;
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const commit = (keep) => {
    if (done) return;
    done = true;
    if (keep && input.value.trim()) c.title = input.value.trim().slice(0, 100);
    save();
    render();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") commit(true);
    if (e.key === "Escape") commit(false);
  });
  input.addEventListener("blur", () => commit(true));
}

function remove(c) {
  if (state.controller && c.id === state.current) return;
  state.convs = state.convs.filter((x) => x.id !== c.id);
  if (state.current === c.id) state.current = state.convs[0]?.id ?? null;
  save();
  render();
}

function exportConversation(c) {
  const data = { title: c.title, created: new Date(c.created).toISOString(), model: state.model, messages: apiMessages(c.messages), page: c };
  const url = URL.createObjectURL(new Blob([JSON.stringify(data, null, 2)], { type: "application/json" }));
  const a = el("a");
  a.href = url;
  a.download = `${c.title.replace(/[^\w.-]+/g, "_").slice(0, 60) || "conversation"}.json`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// --- messages -----------------------------------------------------------------------------------

function render() {
  renderList();
  const c = conv();
  $("#title").textContent = c ? c.title : "New chat";
  const box = $("#messages");
  box.replaceChildren();
  if (!c || !c.messages.length) {
    box.append(el("div", "empty", state.model ? `Ask ${state.model} anything: text, images (paste or drop them here) and audio.` : "…"));
    return;
  }
  const lastUser = c.messages.findLastIndex((m) => m.role === "user");
  c.messages.forEach((m, i) => box.append(messageView(m, i, c, i === lastUser, i === c.messages.length - 1)));
  box.scrollTop = box.scrollHeight;
}

function messageView(m, i, c, isLastUser, isLast) {
  const div = el("div", `msg ${m.role}`);
  if (m.role === "user") {
    if (m.attachments?.length) div.append(attachmentsView(m.attachments));
    div.append(el("div", "text", m.text));
    if (isLastUser && !state.controller) div.append(actions([["Edit", "edit", () => editLast(c, i)]]));
  } else if (m.role === "assistant") {
    fillAssistant(div, m, false, m.tool_calls?.length ? toolCallsView(m, i, c) : null);
    if (isLast && !state.controller) div.append(actions([["Regenerate", "regenerate", () => regenerate(c)]]));
  } else if (m.role === "tool") {
    const card = el("div", "tool-result");
    card.append(el("div", "tool-head", `Result of ${m.name || "tool"}`), el("pre", "tool-body", m.content));
    div.append(card);
  } else if (m.role === "error") {
    div.append(el("div", "text", m.text));
    if (isLast && !state.controller) div.append(actions([["Retry", "regenerate", () => regenerate(c)]]));
  }
  return div;
}

function actions(list) {
  const bar = el("div", "actions");
  for (const [text, cls, fn] of list) bar.append(button(text, cls, fn));
  return bar;
}

function attachmentsView(list) {
  const box = el("div", "attachments");
  for (const a of list) {
    if (a.dropped) box.append(el("span", "dropped", `${a.kind} (not kept in storage)`));
    else if (a.kind === "image") {
      const img = el("img", "thumb");
      img.src = a.url;
      img.alt = a.name;
      box.append(img);
    } else {
      const audio = el("audio");
      audio.controls = true;
      audio.src = a.url;
      box.append(audio);
    }
  }
  return box;
}

/** Thought (folded), answer (Markdown), tool calls and statistics of an assistant message. */
function fillAssistant(div, m, streaming = false, calls = null) {
  const unfolded = div.querySelector("details.thought")?.open; // the reader's choice, kept while streaming
  div.replaceChildren();
  if (m.reasoning) {
    const d = el("details", "thought");
    d.open = !!unfolded;
    d.append(el("summary", null, streaming && !m.content ? "Thinking…" : "Thought"), el("div", "thought-text", m.reasoning));
    div.append(d);
  }
  const body = el("div", "markdown");
  body.append(window.renderMarkdown(m.content || ""));
  div.append(body);
  if (calls) div.append(calls);
  if (m.stats) div.append(statsView(m.stats));
}

function statsView(s) {
  const bar = el("div", "stats");
  const item = (k, text) => {
    const span = el("span", null, text);
    span.dataset.k = k;
    bar.append(span);
  };
  if (s.stopped) item("stopped", "stopped");
  if (s.tps != null) item("tps", `${s.tps.toFixed(1)} tok/s`);
  if (s.completion != null) item("completion", `${s.completion} tokens`);
  if (s.prompt != null) item("prompt", `${s.prompt} prompt`);
  if (s.cached != null) item("cached", `${s.cached} cached`);
  if (s.acceptance != null) item("acceptance", `draft ${(100 * s.acceptance).toFixed(0)}% accepted`);
  return bar;
}

function toolCallsView(m, i, c) {
  const box = el("div", "tool-calls");
  const answered = new Set(c.messages.slice(i + 1).filter((x) => x.role === "tool").map((x) => x.tool_call_id));
  for (const call of m.tool_calls) {
    const card = el("div", "tool-call");
    card.dataset.name = call.name;
    let args = call.arguments;
    try {
      args = JSON.stringify(JSON.parse(call.arguments), null, 2);
    } catch {}
    card.append(el("div", "tool-head", `Tool call: ${call.name}`), el("pre", "tool-args", args));
    if (!answered.has(call.id) && !state.controller) {
      const input = el("textarea", "tool-result-input");
      input.placeholder = "The tool's result (text or JSON), sent back to the model";
      input.rows = 2;
      card.append(
        input,
        button("Send result", "send-result", () => {
          c.messages.push({ role: "tool", tool_call_id: call.id, name: call.name, content: input.value });
          save();
          const pending = m.tool_calls.filter((t) => !c.messages.some((x) => x.role === "tool" && x.tool_call_id === t.id));
          if (pending.length) render();
          else complete(c);
        }),
      );
    }
    box.append(card);
  }
  return box;
}

function editLast(c, i) {
  const m = c.messages[i];
  c.messages.splice(i);
  save();
  $("#input").value = m.text;
  state.pending = (m.attachments || []).filter((a) => !a.dropped);
  renderPending();
  render();
  $("#input").focus();
}

function regenerate(c) {
  const lastUser = c.messages.findLastIndex((m) => m.role === "user");
  if (lastUser < 0) return;
  c.messages.splice(lastUser + 1);
  save();
  complete(c);
}

// --- requests -----------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

/** The conversation as OpenAI chat messages. */
function apiMessages(messages) {
  const out = [];
  if (state.settings.system.trim()) out.push({ role: "system", content: state.settings.system });
  for (const m of messages) {
    if (m.role === "user") {
      const media = (m.attachments || []).filter((a) => !a.dropped);
      if (!media.length) out.push({ role: "user", content: m.text });
      else {
        const parts = media.map((a) =>
          a.kind === "image"
            ? { type: "image_url", image_url: { url: a.url } }
            : { type: "input_audio", input_audio: { data: a.url.slice(a.url.indexOf(",") + 1), format: "wav" } },
        );
        if (m.text) parts.push({ type: "text", text: m.text });
        out.push({ role: "user", content: parts });
      }
    } else if (m.role === "assistant") {
      const msg = { role: "assistant", content: m.content || (m.tool_calls?.length ? null : "") };
      if (m.tool_calls?.length)
        msg.tool_calls = m.tool_calls.map((t) => ({ id: t.id, type: "function", function: { name: t.name, arguments: t.arguments } }));
      out.push(msg);
    } else if (m.role === "tool") out.push({ role: "tool", tool_call_id: m.tool_call_id, content: m.content });
  }
  return out;
}

function tools() {
  const text = state.settings.tools.trim();
  if (!text) return null;
  const value = JSON.parse(text); // checked when the settings were edited
  const list = Array.isArray(value) ? value : [value];
  return list.map((t) => (t.type === "function" ? t : { type: "function", function: t }));
}

function requestBody(c) {
  const s = state.settings;
  const body = {
    model: state.model,
    messages: apiMessages(c.messages),
    stream: true,
    stream_options: { include_usage: true },
    chat_template_kwargs: { enable_thinking: !!s.thinking },
  };
  if (s.temperature !== "") body.temperature = Number(s.temperature);
  if (s.top_p !== "") body.top_p = Number(s.top_p);
  if (s.max_tokens !== "") body.max_tokens = Number(s.max_tokens);
  const t = tools();
  if (t) body.tools = t;
  return body;
}

function send() {
  if (state.controller) return;
  const text = $("#input").value;
  if (!text.trim() && !state.pending.length) return;
  if (!settingsValid()) return;
  const c = conv() || newConversation();
  if (!c.messages.length) c.title = (text.trim() || state.pending[0].name).replace(/\s+/g, " ").slice(0, 40);
  c.messages.push({ role: "user", text, attachments: state.pending.length ? state.pending : undefined });
  $("#input").value = "";
  state.pending = [];
  renderPending();
  autosize();
  save();
  complete(c);
}

function apiError(status, body) {
  const message = body?.error?.message || `HTTP ${status}`;
  return Object.assign(new Error(message), { status });
}

/** Stream the model's next turn into `c`. */
async function complete(c) {
  if (!state.model) {
    const error = await fetchModel();
    if (error) {
      c.messages.push({ role: "error", text: error.message });
      save();
      render();
      return;
    }
  }
  const body = JSON.stringify(requestBody(c));
  const m = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
  c.messages.push(m);
  state.controller = new AbortController();
  setBusy(true);
  render();
  const div = $("#messages").lastElementChild;
  let frame = 0;
  const paint = () => {
    frame = 0;
    const box = $("#messages");
    const follow = box.scrollHeight - box.scrollTop - box.clientHeight < 80; // the reader is at the end
    fillAssistant(div, m, true, m.tool_calls.length ? toolCallsView(m, c.messages.length - 1, c) : null);
    if (follow) box.scrollTop = box.scrollHeight;
  };
  const schedule = () => (frame ||= requestAnimationFrame(paint));
  const stats = {};
  const started = performance.now();
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body, signal: state.controller.signal });
    if (!res.ok) throw apiError(res.status, await res.json().catch(() => null));
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw apiError(500, chunk);
          const delta = chunk.choices?.[0]?.delta;
          if (delta?.content) m.content += delta.content;
          if (delta?.reasoning_content) m.reasoning += delta.reasoning_content;
          for (const t of delta?.tool_calls || []) {
            const call = (m.tool_calls[t.index] ||= { id: "", name: "", arguments: "" });
            if (t.id) call.id = t.id;
            if (t.function?.name) call.name += t.function.name;
            if (t.function?.arguments) call.arguments += t.function.arguments;
          }
          if (chunk.timings) {
            stats.tps = chunk.timings.generation_tokens_per_second;
            stats.acceptance = chunk.timings.draft_acceptance;
          }
          if (chunk.usage) {
            stats.prompt = chunk.usage.prompt_tokens;
            stats.completion = chunk.usage.completion_tokens;
            stats.cached = chunk.usage.prompt_tokens_details?.cached_tokens ?? 0;
          }
          schedule();
        }
      }
    }
    m.stats = stats;
  } catch (e) {
    if (e.name === "AbortError") {
      const seconds = (performance.now() - started) / 1000;
      m.stats = { stopped: true };
      if (seconds > 0) m.stats.elapsed = seconds;
    } else {
      if (!m.content && !m.reasoning && !m.tool_calls.length) c.messages.pop();
      else m.stats = stats;
      c.messages.push({ role: "error", text: e.message });
      if (e.status === 401) askKey(e.message);
    }
  } finally {
    if (frame) cancelAnimationFrame(frame);
    if (!m.tool_calls.length) delete m.tool_calls;
    if (!m.reasoning) delete m.reasoning;
    state.controller = null;
    setBusy(false);
    save();
    render();
  }
}

function stop() {
  state.controller?.abort();
}

function setBusy(busy) {
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

// --- the server and its key ---------------------------------------------------------------------

async function fetchModel() {
  try {
    const res = await fetch("/v1/models", { headers: headers() });
    const body = await res.json().catch(() => null);
    if (!res.ok) throw apiError(res.status, body);
    state.model = body.data[0].id;
    $("#model-name").textContent = state.model;
    $("#key-dialog").close();
    return null;
  } catch (e) {
    if (e.status === 401) askKey(e.message);
    else notice(`The server did not answer: ${e.message}`);
    return e;
  }
}

function askKey(message) {
  const d = $("#key-dialog");
  $("#key-error").textContent = message || "";
  $("#key-input").value = "";
  if (!d.open) d.showModal();
  $("#key-input").focus();
}

function saveKey(e) {
  e.preventDefault();
  state.key = $("#key-input").value.trim();
  localStorage.setItem(STORE.key, state.key);
  $("#key-error").textContent = "Checking…";
  fetchModel().then((error) => error || render());
}

function notice(text) {
  const n = $("#notice");
  n.textContent = text;
  n.hidden = false;
}

// --- attachments --------------------------------------------------------------------------------

const readURL = (blob) =>
  new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });

/** Any audio the browser decodes, as a 16 kHz mono 16-bit WAV data URI. */
async function wavURL(blob) {
  const decoded = await new OfflineAudioContext(1, 1, RATE).decodeAudioData(await blob.arrayBuffer());
  const ctx = new OfflineAudioContext(1, Math.max(1, Math.round(decoded.duration * RATE)), RATE);
  const source = ctx.createBufferSource();
  source.buffer = decoded;
  source.connect(ctx.destination);
  source.start();
  const samples = (await ctx.startRendering()).getChannelData(0);
  const view = new DataView(new ArrayBuffer(44 + 2 * samples.length));
  const text = (at, s) => [...s].forEach((ch, k) => view.setUint8(at + k, ch.charCodeAt(0)));
  text(0, "RIFF");
  view.setUint32(4, 36 + 2 * samples.length, true);
  text(8, "WAVEfmt ");
  view.setUint32(16, 16, true);
  view.setUint16(20, 1, true); // PCM
  view.setUint16(22, 1, true); // mono
  view.setUint32(24, RATE, true);
  view.setUint32(28, 2 * RATE, true);
  view.setUint16(32, 2, true);
  view.setUint16(34, 16, true);
  text(36, "data");
  view.setUint32(40, 2 * samples.length, true);
  samples.forEach((x, k) => view.setInt16(44 + 2 * k, Math.max(-32768, Math.min(32767, Math.round(x * 32768))), true));
  return readURL(new Blob([view], { type: "audio/wav" }));
}

async function addFiles(files) {
  for (const f of files) {
    try {
      if (f.type.startsWith("image/")) state.pending.push({ kind: "image", url: await readURL(f), name: f.name || "image" });
      else if (f.type.startsWith("audio/") || /\.(wav|mp3|flac|ogg|opus|m4a|aac|webm)$/i.test(f.name))
        state.pending.push({ kind: "audio", url: await wavURL(f), name: f.name || "audio" });
      else notice(`${f.name}: not an image or audio file`);
    } catch (e) {
      notice(`${f.name}: could not be read (${e.message || e})`);
    }
  }
  renderPending();
}

function renderPending() {
  const box = $("#pending");
  box.replaceChildren();
  state.pending.forEach((a, k) => {
    const item = el("div", `pending-item ${a.kind}`);
    if (a.kind === "image") {
      const img = el("img", "thumb");
      img.src = a.url;
      img.alt = a.name;
      item.append(img);
    } else {
      const audio = el("audio");
      audio.controls = true;
      audio.src = a.url;
      item.append(audio);
    }
    item.append(
      button("×", "remove", () => {
        state.pending.splice(k, 1);
        renderPending();
      }, `Remove ${a.name}`),
    );
    box.append(item);
  });
}

async function toggleRecording() {
  const btn = $("#record");
  if (state.recorder) {
    state.recorder.stop();
    return;
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    notice(`The microphone is not available: ${e.message || e.name}`);
    return;
  }
  const chunks = [];
  const rec = new MediaRecorder(stream);
  state.recorder = rec;
  const started = Date.now();
  const tick = setInterval(() => (btn.textContent = `■ ${Math.round((Date.now() - started) / 1000)} s`), 250);
  btn.classList.add("recording");
  btn.textContent = "■ 0 s";
  rec.ondataavailable = (e) => chunks.push(e.data);
  rec.onstop = async () => {
    clearInterval(tick);
    stream.getTracks().forEach((t) => t.stop());
    state.recorder = null;
    btn.classList.remove("recording");
    btn.textContent = "● Record";
    try {
      state.pending.push({ kind: "audio", url: await wavURL(new Blob(chunks, { type: rec.mimeType })), name: "recording.wav" });
      renderPending();
    } catch (e) {
      notice(`The recording could not be decoded: ${e.message || e}`);
    }
  };
  rec.start();
}

// --- settings -----------------------------------------------------------------------------------

function settingsValid() {
  const err = $("#tools-error");
  err.textContent = "";
  const text = state.settings.tools.trim();
  if (!text) return true;
  try {
    const list = JSON.parse(text);
    for (const t of Array.isArray(list) ? list : [list]) {
      const f = t.type === "function" ? t.function : t;
      if (!f || typeof f.name !== "string") throw new Error("each tool needs a function name");
    }
    return true;
  } catch (e) {
    err.textContent = `Tools: ${e.message}`;
    $("#settings").hidden = false;
    return false;
  }
}

function bindSettings() {
  for (const k of ["temperature", "top_p", "max_tokens", "system", "tools"]) {
    const input = $(`#set-${k}`);
    input.value = state.settings[k];
    input.addEventListener("input", () => {
      state.settings[k] = input.value;
      saveSettings();
    });
  }
  $("#set-tools").addEventListener("change", settingsValid);
  const thinking = $("#thinking");
  thinking.checked = !!state.settings.thinking;
  thinking.addEventListener("change", () => {
    state.settings.thinking = thinking.checked;
    saveSettings();
  });
}

/** Copies `text`: the Clipboard API where the page is a secure context, else a selection. */
async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    const ok = document.execCommand("copy");
    area.remove();
    return ok;
  }
}

// --- wiring -------------------------------------------------------------------------------------

function autosize() {
  const t = $("#input");
  t.style.height = "auto";
  t.style.height = `${Math.min(t.scrollHeight, 240)}px`;
}

function init() {
  load();
  bindSettings();
  $("#composer").addEventListener("submit", (e) => {
    e.preventDefault();
    send();
  });
  $("#input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  });
  $("#input").addEventListener("input", autosize);
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", () => {
    if (state.controller) return;
    newConversation();
    render();
    document.body.classList.remove("show-sidebar");
    $("#input").focus();
  });
  $("#menu").addEventListener("click", () => document.body.classList.toggle("show-sidebar"));
  $("#toggle-settings").addEventListener("click", () => ($("#settings").hidden = !$("#settings").hidden));
  $("#change-key").addEventListener("click", () => askKey(""));
  $("#key-form").addEventListener("submit", saveKey);
  $("#attach-image").addEventListener("click", () => $("#image-file").click());
  $("#attach-audio").addEventListener("click", () => $("#audio-file").click());
  for (const id of ["#image-file", "#audio-file"]) {
    $(id).addEventListener("change", async (e) => {
      await addFiles([...e.target.files]);
      e.target.value = "";
    });
  }
  $("#record").addEventListener("click", toggleRecording);
  $("#notice").addEventListener("click", () => ($("#notice").hidden = true));
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) {
      e.preventDefault();
      addFiles(files);
    }
  });
  const main = $("main");
  main.addEventListener("dragover", (e) => {
    e.preventDefault();
    main.classList.add("dragging");
  });
  main.addEventListener("dragleave", () => main.classList.remove("dragging"));
  main.addEventListener("drop", (e) => {
    e.preventDefault();
    main.classList.remove("dragging");
    addFiles([...(e.dataTransfer?.files || [])]);
  });
  $("#messages").addEventListener("click", async (e) => {
    const copy = e.target.closest(".copy");
    if (!copy) return;
    const code = copy.closest(".code").querySelector("code").textContent;
    copy.textContent = (await copyText(code)) ? "Copied" : "Copy failed";
    setTimeout(() => (copy.textContent = "Copy"), 1500);
  });
  render();
  fetchModel().then((error) => error || render());
}

document.addEventListener("DOMContentLoaded", init);
