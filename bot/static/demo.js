// The demo chat page: plays a Telegram client against the emulator's user-side API (/_emu/).
// Vanilla JS, no build step, nothing loaded from outside: the demo must work offline.
"use strict";

const TEXTS = {
  zh: {
    pageTitle: "图书馆机器人 · 演示",
    chooseTitle: "选择身份",
    chooseHint: "以谁的身份与图书馆机器人对话？每个身份是一位模拟的 Telegram 用户。",
    demoNote: "演示模式：一切都在本机运行，不连接 Telegram。可在多个浏览器标签页中分别扮演不同身份。",
    switch: "切换身份",
    send: "发送",
    placeholder: "输入消息…",
    start: "开始",
    bot: "机器人",
    typing: "正在输入…",
    uploading: "正在发送文件…",
    edited: "已编辑",
    photo: "照片",
    noCommands: "机器人还没有设置命令菜单。",
    offline: "与演示服务器的连接中断，正在重试…",
    sendFailed: "发送失败：",
    sendPhoto: "发送照片",
    guest: "访客",
    guestDesc: "一位普通的 Telegram 用户",
    langLabel: "English",
  },
  en: {
    pageTitle: "Library Bot · demo",
    chooseTitle: "Who are you?",
    chooseHint: "Pick the person you want to be. Each one is a simulated Telegram user talking to the library bot.",
    demoNote: "Demo mode: everything runs on this computer; nothing goes to Telegram. Open several tabs to play several people at once.",
    switch: "Switch person",
    send: "Send",
    placeholder: "Message…",
    start: "Start",
    bot: "bot",
    typing: "typing…",
    uploading: "sending a file…",
    edited: "edited",
    photo: "Photo",
    noCommands: "The bot has not set a command menu yet.",
    offline: "Lost the connection to the demo server, retrying…",
    sendFailed: "Could not send: ",
    sendPhoto: "Send a photo",
    guest: "Guest",
    guestDesc: "An ordinary Telegram user",
    langLabel: "中文",
  },
};

const state = {
  lang: (navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en",
  bot: { first_name: "Library Bot", username: "librarybot" },
  personas: [],
  persona: null, // the person being played
  seq: 0, // last event seen
  poll: null, // AbortController of the running long poll
  rendered: new Map(), // message_id -> element
  messages: new Map(), // message_id -> latest view
  actionTimer: null,
};

const $ = (sel) => document.querySelector(sel);
// The chat a persona talks in: its private chat, or the group it is in (the staff group persona).
const chatOf = (p) => p.chat_id ?? p.user_id;
const t = (key) => TEXTS[state.lang][key] ?? TEXTS.en[key] ?? key;

// ---------------------------------------------------------------------------------------------
// Page chrome, both languages

function applyLanguage() {
  document.documentElement.lang = state.lang === "zh" ? "zh-CN" : "en";
  document.title = t("pageTitle");
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  $("#message-input").placeholder = t("placeholder");
  $("#photo-button").title = t("sendPhoto");
  $("#lang-toggle").textContent = t("langLabel");
  updateHeader();
  renderPersonas();
  for (const [id, view] of state.messages) renderMessage(view, id); // "edited" labels
}

function updateHeader(subtitle) {
  $("#chat-title").textContent = state.bot.first_name || "Library Bot";
  if (subtitle !== undefined) {
    $("#chat-subtitle").textContent = subtitle;
  } else if (state.persona) {
    $("#chat-subtitle").textContent = `${t("bot")} · @${state.bot.username} — ${personaLabel(state.persona)}`;
  } else {
    $("#chat-subtitle").textContent = `${t("bot")} · @${state.bot.username}`;
  }
}

function personaLabel(p) {
  return (state.lang === "zh" ? p.label_zh || p.label_en : p.label_en || p.label_zh) || p.first_name || String(p.user_id);
}

function personaDescription(p) {
  return (state.lang === "zh" ? p.description_zh || p.description_en : p.description_en || p.description_zh) || "";
}

function showToast(text, alert = false) {
  const toast = $("#toast");
  toast.textContent = text;
  toast.className = alert ? "alert" : "";
  toast.hidden = false;
  clearTimeout(showToast.timer);
  if (alert) {
    toast.onclick = () => { toast.hidden = true; };
  } else {
    showToast.timer = setTimeout(() => { toast.hidden = true; }, 2500);
  }
}

function setOffline(offline) {
  const line = $("#status-line");
  line.textContent = t("offline");
  line.hidden = !offline;
}

// ---------------------------------------------------------------------------------------------
// HTTP

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  };
  const resp = await fetch(path, init);
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.description || `HTTP ${resp.status}`);
  return data;
}

// ---------------------------------------------------------------------------------------------
// Persona choice

async function loadPersonas() {
  try {
    const data = await api("/_emu/personas");
    state.personas = data.personas || [];
    if (data.bot) state.bot = data.bot;
  } catch (err) {
    state.personas = [];
  }
  if (!state.personas.length) {
    // Nobody configured: one guest, so the page still works on a bare emulator.
    state.personas = [{ user_id: 10001, first_name: "Guest", label_zh: t("guest"), label_en: "Guest",
      description_zh: TEXTS.zh.guestDesc, description_en: TEXTS.en.guestDesc }];
  }
  renderPersonas();
  updateHeader();
}

function renderPersonas() {
  const list = $("#persona-list");
  list.replaceChildren();
  for (const p of state.personas) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.userId = String(p.user_id);
    button.dataset.chatId = String(chatOf(p));
    const name = document.createElement("span");
    name.className = "persona-name";
    name.textContent = personaLabel(p);
    if (p.language_code) {
      const lang = document.createElement("span");
      lang.className = "persona-lang";
      lang.textContent = p.language_code.toLowerCase().startsWith("zh") ? "中文" : p.language_code.toUpperCase();
      name.appendChild(lang);
    }
    const desc = document.createElement("span");
    desc.className = "persona-desc";
    desc.textContent = personaDescription(p);
    const id = document.createElement("span");
    id.className = "persona-id";
    id.textContent = `Telegram ID ${p.user_id}`;
    button.append(name, desc, id);
    button.addEventListener("click", () => choosePersona(p));
    list.appendChild(button);
  }
}

async function choosePersona(p) {
  stopPolling();
  state.persona = p;
  state.rendered.clear();
  state.messages.clear();
  $("#messages").replaceChildren();
  $("#persona-screen").hidden = true;
  $("#chat-screen").hidden = false;
  $("#switch-persona").hidden = false;
  $("#command-menu").hidden = true;
  history.replaceState(null, "", `#chat=${chatOf(p)}`);
  updateHeader();
  try {
    const snapshot = await api(`/_emu/chats/${chatOf(p)}/messages`);
    state.seq = snapshot.seq;
    for (const view of snapshot.messages) if (!view.deleted) renderMessage(view);
  } catch (err) {
    state.seq = 0;
  }
  refreshChrome();
  scrollToBottom(true);
  $("#message-input").focus();
  startPolling();
}

function backToPersonas() {
  stopPolling();
  state.persona = null;
  $("#toast").hidden = true;
  history.replaceState(null, "", location.pathname);
  $("#chat-screen").hidden = true;
  $("#persona-screen").hidden = false;
  $("#switch-persona").hidden = true;
  updateHeader();
  loadPersonas();
}

// ---------------------------------------------------------------------------------------------
// Events (long poll)

function stopPolling() {
  if (state.poll) state.poll.abort();
  state.poll = null;
}

async function startPolling() {
  const controller = new AbortController();
  state.poll = controller;
  const chatId = chatOf(state.persona);
  let delay = 500;
  while (state.poll === controller) {
    try {
      const resp = await fetch(`/_emu/chats/${chatId}/events?after=${state.seq}&wait=25`, { signal: controller.signal });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      const data = await resp.json();
      if (state.poll !== controller) return;
      setOffline(false);
      if (data.reset) {
        // The demo server was restarted: start this chat afresh from its current state.
        choosePersona(state.persona);
        return;
      }
      delay = 500;
      for (const event of data.events) handleEvent(event);
      state.seq = Math.max(state.seq, data.seq);
    } catch (err) {
      if (controller.signal.aborted) return;
      setOffline(true);
      await new Promise((resolve) => setTimeout(resolve, delay));
      delay = Math.min(delay * 2, 5000);
    }
  }
}

function handleEvent(event) {
  if (event.seq <= state.seq) return;
  state.seq = event.seq;
  switch (event.type) {
    case "new":
    case "edit":
      renderMessage(event.message);
      if (event.message.from_bot) updateHeader();
      refreshChrome();
      scrollToBottom(event.type === "new");
      break;
    case "delete":
      removeMessage(event.message.message_id);
      refreshChrome();
      break;
    case "callback_answer":
      if (event.answer.user_id === state.persona.user_id) {
        enableButtons(event.answer.message_id);
        if (event.answer.text) showToast(event.answer.text, event.answer.show_alert);
        if (event.answer.url) window.open(event.answer.url, "_blank", "noopener");
      }
      break;
    case "action":
      updateHeader(event.action === "typing" ? t("typing") : t("uploading"));
      clearTimeout(state.actionTimer);
      state.actionTimer = setTimeout(() => updateHeader(), 4000);
      break;
    default:
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Rendering messages

// Telegram's HTML subset; anything else is dropped and only its text kept.
const ALLOWED_TAGS = {
  B: "b", STRONG: "b", I: "i", EM: "i", U: "u", INS: "u", S: "s", STRIKE: "s", DEL: "s",
  CODE: "code", PRE: "pre", A: "a", BLOCKQUOTE: "blockquote", "TG-SPOILER": "span", SPAN: "span",
};

function renderBotHtml(source, target) {
  // DOMParser documents are inert (no scripts run, nothing loads); the output is rebuilt from
  // scratch with createElement/createTextNode, so nothing the bot sends can inject markup.
  const doc = new DOMParser().parseFromString(`<!doctype html><body>${source}`, "text/html");
  copySafe(doc.body, target);
}

function copySafe(from, to) {
  for (const node of from.childNodes) {
    if (node.nodeType === Node.TEXT_NODE) {
      to.appendChild(document.createTextNode(node.nodeValue));
    } else if (node.nodeType === Node.ELEMENT_NODE) {
      const tag = ALLOWED_TAGS[node.tagName];
      if (!tag || node.tagName === "SCRIPT" || node.tagName === "STYLE") {
        if (node.tagName !== "SCRIPT" && node.tagName !== "STYLE") copySafe(node, to);
        continue;
      }
      const el = document.createElement(tag);
      if (tag === "a") {
        const href = node.getAttribute("href") || "";
        if (/^(https?:|tg:|mailto:)/i.test(href)) {
          el.href = href;
          el.target = "_blank";
          el.rel = "noopener noreferrer";
        }
      }
      if (node.tagName === "TG-SPOILER" || (node.tagName === "SPAN" && node.classList.contains("tg-spoiler"))) {
        el.className = "spoiler";
        el.addEventListener("click", () => el.classList.add("revealed"));
      }
      copySafe(node, el);
      to.appendChild(el);
    }
  }
}

function formatTime(unix) {
  if (!unix) return "";
  const d = new Date(unix * 1000);
  return d.toLocaleTimeString(state.lang === "zh" ? "zh-CN" : "en-GB", { hour: "2-digit", minute: "2-digit" });
}

function buildMessage(view) {
  const wrap = document.createElement("div");
  wrap.className = `message ${view.from_bot ? "bot" : "user"}`;
  wrap.dataset.messageId = String(view.message_id);
  const bubble = document.createElement("div");
  bubble.className = "bubble";
  wrap.appendChild(bubble);

  if (view.reply_to_message_id && state.messages.has(view.reply_to_message_id)) {
    const quoted = document.createElement("div");
    quoted.className = "reply-to";
    quoted.textContent = state.messages.get(view.reply_to_message_id).plain || "…";
    bubble.appendChild(quoted);
  }
  if (view.photo) {
    const box = document.createElement("div");
    box.className = "photo";
    const img = document.createElement("img");
    img.alt = t("photo");
    img.src = `/_emu/files/${encodeURIComponent(view.photo)}`;
    img.addEventListener("error", () => {
      const placeholder = document.createElement("div");
      placeholder.className = "placeholder";
      placeholder.textContent = `🖼 ${t("photo")}`;
      img.replaceWith(placeholder);
    });
    box.appendChild(img);
    bubble.appendChild(box);
  }
  if (view.document) {
    const doc = document.createElement("div");
    doc.className = "document";
    const icon = document.createElement("span");
    icon.className = "icon";
    icon.textContent = "📄";
    const link = document.createElement("a");
    link.href = view.document.url;
    link.download = view.document.file_name || "";
    link.textContent = view.document.file_name || "file";
    doc.append(icon, link);
    bubble.appendChild(doc);
  }
  const text = document.createElement("div");
  text.className = "text";
  if (view.sticker !== null && view.sticker !== undefined) {
    text.classList.add("sticker");
    text.textContent = view.sticker || "🖼";
  } else if (view.from_bot && (view.parse_mode || "").toUpperCase() === "HTML") {
    renderBotHtml(view.text || "", text);
  } else {
    text.textContent = view.text || "";
  }
  bubble.appendChild(text);

  const meta = document.createElement("div");
  meta.className = "meta";
  meta.textContent = (view.edited ? `${t("edited")} ` : "") + formatTime(view.date);
  bubble.appendChild(meta);

  if (view.buttons && view.buttons.length) {
    const keyboard = document.createElement("div");
    keyboard.className = "inline-keyboard";
    for (const row of view.buttons) {
      const line = document.createElement("div");
      line.className = "row";
      for (const b of row) {
        if (b.url && b.callback_data === undefined) {
          const a = document.createElement("a");
          a.href = /^(https?:|tg:)/i.test(b.url) ? b.url : "#";
          a.target = "_blank";
          a.rel = "noopener noreferrer";
          a.textContent = `${b.text} ↗`;
          line.appendChild(a);
        } else {
          const button = document.createElement("button");
          button.type = "button";
          button.textContent = b.text;
          button.dataset.callbackData = b.callback_data ?? "";
          button.addEventListener("click", () => press(view.message_id, b.callback_data ?? "", button));
          line.appendChild(button);
        }
      }
      keyboard.appendChild(line);
    }
    wrap.appendChild(keyboard);
  }
  return wrap;
}

function renderMessage(view, id = view.message_id) {
  if (view.deleted) {
    removeMessage(id);
    return;
  }
  state.messages.set(id, view);
  const el = buildMessage(view);
  const old = state.rendered.get(id);
  if (old) {
    old.replaceWith(el);
  } else {
    // Keep message order even if a snapshot and an event race.
    const container = $("#messages");
    const last = container.lastElementChild;
    if (!last || Number(last.dataset.messageId) < id) {
      container.appendChild(el);
    } else {
      const later = [...state.rendered.keys()].filter((k) => k > id).sort((a, b) => a - b)[0];
      container.insertBefore(el, later === undefined ? null : state.rendered.get(later));
    }
  }
  state.rendered.set(id, el);
}

function removeMessage(id) {
  const el = state.rendered.get(id);
  if (el) el.remove();
  state.rendered.delete(id);
  state.messages.delete(id);
}

function scrollToBottom(force) {
  const box = $("#messages");
  const near = box.scrollHeight - box.scrollTop - box.clientHeight < 160;
  if (force || near) box.scrollTop = box.scrollHeight;
}

// Reply keyboard and the Start button follow the chat's state, as in Telegram.
function refreshChrome() {
  const views = [...state.messages.values()].sort((a, b) => a.message_id - b.message_id);
  $("#start-bar").hidden = views.length > 0;
  let rows = [];
  for (const v of views) {
    if (!v.from_bot) continue;
    if (v.reply_keyboard && v.reply_keyboard.length) rows = v.reply_keyboard;
    else if (v.remove_keyboard) rows = [];
  }
  const box = $("#reply-keyboard");
  box.replaceChildren();
  for (const row of rows) {
    const line = document.createElement("div");
    line.className = "row";
    for (const label of row) {
      const button = document.createElement("button");
      button.type = "button";
      button.textContent = label;
      button.addEventListener("click", () => sendText(label));
      line.appendChild(button);
    }
    box.appendChild(line);
  }
  box.hidden = rows.length === 0;
}

function enableButtons(messageId) {
  const el = state.rendered.get(messageId);
  if (el) for (const b of el.querySelectorAll(".inline-keyboard button")) b.disabled = false;
}

// ---------------------------------------------------------------------------------------------
// Acting as the user

function userFields() {
  const p = state.persona;
  return {
    user_id: p.user_id,
    first_name: p.first_name || personaLabel(p),
    last_name: p.last_name || undefined,
    username: p.username || undefined,
    // The persona's own Telegram language if it has one, else this page's language.
    language_code: p.language_code || (state.lang === "zh" ? "zh-hans" : "en"),
    // In a group the message goes to the group (the staff group persona), as in Telegram.
    chat_id: p.chat_id ?? undefined,
    chat_type: p.chat_type ?? undefined,
    chat_title: p.chat_title ?? undefined,
  };
}

async function sendPhoto(file) {
  if (!file || !state.persona) return;
  const input = $("#message-input");
  const caption = input.value.trim();
  input.value = "";
  try {
    const data = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
    const result = await api("/_emu/send", { ...userFields(), photo: { content_b64: data }, caption: caption || undefined });
    if (!state.rendered.has(result.message.message_id)) {
      renderMessage(result.message);
      refreshChrome();
      scrollToBottom(true);
    }
  } catch (err) {
    showToast(t("sendFailed") + err.message);
  }
}

async function sendText(text) {
  text = text.trim();
  if (!text || !state.persona) return;
  $("#command-menu").hidden = true;
  try {
    const result = await api("/_emu/send", { ...userFields(), text });
    // Show it at once; the event that follows is recognised by its id.
    if (!state.rendered.has(result.message.message_id)) {
      renderMessage(result.message);
      refreshChrome();
      scrollToBottom(true);
    }
  } catch (err) {
    showToast(t("sendFailed") + err.message);
  }
}

async function press(messageId, data, button) {
  if (button) button.disabled = true;
  try {
    await api("/_emu/press", { ...userFields(), message_id: messageId, data });
  } catch (err) {
    showToast(t("sendFailed") + err.message);
  } finally {
    // Telegram shows a spinner until the bot answers; do not leave it forever if it never does.
    setTimeout(() => { if (button) button.disabled = false; }, 1500);
  }
}

async function toggleCommandMenu() {
  const menu = $("#command-menu");
  if (!menu.hidden) {
    menu.hidden = true;
    return;
  }
  const p = state.persona;
  const fields = userFields();
  let commands = [];
  try {
    const params = new URLSearchParams({ chat_id: chatOf(p), user_id: p.user_id, language_code: fields.language_code });
    commands = (await api(`/_emu/commands?${params}`)).commands || [];
  } catch (err) {
    commands = [];
  }
  menu.replaceChildren();
  if (!commands.length) {
    const empty = document.createElement("div");
    empty.className = "empty";
    empty.textContent = t("noCommands");
    menu.appendChild(empty);
  }
  for (const c of commands) {
    const item = document.createElement("button");
    item.type = "button";
    const cmd = document.createElement("span");
    cmd.className = "cmd";
    cmd.textContent = `/${c.command}`;
    const desc = document.createElement("span");
    desc.className = "desc";
    desc.textContent = c.description;
    item.append(cmd, desc);
    item.addEventListener("click", () => sendText(`/${c.command}`));
    menu.appendChild(item);
  }
  menu.hidden = false;
}

// ---------------------------------------------------------------------------------------------
// Wiring

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const input = $("#message-input");
  const text = input.value;
  input.value = "";
  sendText(text);
  input.focus();
});
$("#menu-button").addEventListener("click", toggleCommandMenu);
$("#start-button").addEventListener("click", () => sendText("/start"));
$("#switch-persona").addEventListener("click", backToPersonas);
$("#photo-button").addEventListener("click", () => $("#photo-input").click());
$("#photo-input").addEventListener("change", (event) => {
  const file = event.target.files && event.target.files[0];
  event.target.value = "";
  sendPhoto(file);
});
$("#lang-toggle").addEventListener("click", () => {
  state.lang = state.lang === "zh" ? "en" : "zh";
  // The person being played switches language too, as their Telegram app would: the bot answers
  // in it from the next message (unless they chose a language with /language).
  if (state.persona) {
    state.persona.language_code = state.lang === "zh" ? "zh-hans" : "en";
    updateHeader();
  }
  try { localStorage.setItem("librarybot-demo-lang", state.lang); } catch (err) { /* private mode */ }
  applyLanguage();
});

(async function main() {
  try {
    const saved = localStorage.getItem("librarybot-demo-lang");
    if (saved === "zh" || saved === "en") state.lang = saved;
  } catch (err) { /* private mode */ }
  applyLanguage();
  await loadPersonas();
  // Reopen the same person after a reload (#chat=ID in the address; #user=ID from older links).
  const hash = new URLSearchParams(location.hash.slice(1));
  const wanted = Number(hash.get("chat") ?? hash.get("user"));
  const persona = state.personas.find((p) => chatOf(p) === wanted);
  if (persona) choosePersona(persona);
})();
