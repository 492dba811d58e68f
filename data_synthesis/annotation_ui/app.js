"use strict";
// The ranking page. Everything an instruction or response holds goes into the page as text (textContent),
// never as markup; the server's content security policy also forbids inline scripts.

const state = { item: null, ranking: [], flagged: new Set() };
const $ = (id) => document.getElementById(id);

function say(text) { $("message").textContent = text || ""; }

function make(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

async function call(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: "the server sent no JSON" }));
  return { status: response.status, data };
}

function show(view) {
  for (const id of ["sign-in-view", "item-view", "done-view"]) $(id).hidden = id !== view;
  $("sign-out").hidden = view === "sign-in-view";
}

function signedOut(message) {
  state.item = null;
  $("who").textContent = "";
  $("progress").textContent = "";
  show("sign-in-view");
  say(message);
  $("token").focus();
}

function render(data) {
  state.item = data.item;
  state.ranking = [];
  state.flagged = new Set();
  $("who").textContent = data.annotator;
  const p = data.progress;
  $("progress").textContent =
    `${p.done} done, ${p.skipped} skipped, ${p.left} left for you; ${p.complete} of ${p.items} items complete`;
  $("item-view").dataset.item = data.item ? data.item.id : "";
  if (!data.item) { show("done-view"); return; }
  const prompt = $("prompt");
  prompt.replaceChildren();
  for (const turn of data.item.prompt) {
    const box = make("div", "turn");
    box.append(make("span", "role", turn.role), make("div", "text", turn.content));
    prompt.append(box);
  }
  const list = $("responses");
  list.replaceChildren();
  data.item.responses.forEach((response, position) => {
    const card = make("li", "response");
    card.dataset.index = String(response.index);
    card.dataset.key = String(position + 1);
    const side = make("div");
    side.append(make("span", "key", String(position + 1)), make("span", "rank"));
    const flag = make("button", "flag", "Unusable");
    flag.addEventListener("click", (event) => { event.stopPropagation(); toggleFlag(response.index); });
    card.append(side, make("div", "text", response.content), flag);
    card.addEventListener("click", () => toggleRank(response.index));
    list.append(card);
  });
  $("discard-reason").value = "";
  show("item-view");
  update();
}

function update() {
  for (const card of document.querySelectorAll(".response")) {
    const index = Number(card.dataset.index);
    const place = state.ranking.indexOf(index);
    card.classList.toggle("ranked", place >= 0);
    card.classList.toggle("unusable", state.flagged.has(index));
    card.querySelector(".rank").textContent = place >= 0 ? `rank ${place + 1}` : state.flagged.has(index) ? "unusable" : "";
    card.querySelector(".flag").textContent = state.flagged.has(index) ? "Usable" : "Unusable";
  }
  const usable = state.item.responses.length - state.flagged.size;
  $("submit").disabled = usable === 0 || state.ranking.length !== usable;
}

function toggleRank(index) {
  if (!state.item || state.flagged.has(index)) return;
  const place = state.ranking.indexOf(index);
  if (place >= 0) state.ranking.splice(place, 1); else state.ranking.push(index);
  update();
}

function toggleFlag(index) {
  if (!state.item) return;
  if (state.flagged.has(index)) state.flagged.delete(index);
  else { state.flagged.add(index); state.ranking = state.ranking.filter((i) => i !== index); }
  update();
}

async function answer(body) {
  const { status, data } = await call("/api/answer", { item_id: state.item.id, ...body });
  if (status === 401) return signedOut(data.error);
  if (status !== 200) return say(data.error);
  say(body.action === "submit" ? "Ranking saved." : body.action === "skip" ? "Skipped." : "Item discarded.");
  render(data);
}

async function load() {
  const { status, data } = await call("/api/next", {});
  if (status === 401) return signedOut("");
  if (status !== 200) return say(data.error);
  render(data);
}

$("sign-in").addEventListener("click", async () => {
  const { status, data } = await call("/api/sign-in", { token: $("token").value });
  $("token").value = "";
  if (status !== 200) return say(data.error);
  say("");
  load();
});
$("token").addEventListener("keydown", (event) => { if (event.key === "Enter") $("sign-in").click(); });
$("sign-out").addEventListener("click", async () => { await call("/api/sign-out", {}); signedOut("Signed out."); });
$("submit").addEventListener("click", () =>
  answer({ action: "submit", ranking: state.ranking, flagged: [...state.flagged] }));
$("clear").addEventListener("click", () => { state.ranking = []; state.flagged = new Set(); update(); });
$("skip").addEventListener("click", () => answer({ action: "skip" }));
$("discard").addEventListener("click", () => answer({ action: "discard", reason: $("discard-reason").value }));

document.addEventListener("keydown", (event) => {
  if ($("item-view").hidden || !state.item || event.target.tagName === "INPUT") return;
  const digit = /^Digit([1-9])$/.exec(event.code);
  if (digit) {
    const card = document.querySelector(`.response[data-key="${digit[1]}"]`);
    if (card) (event.shiftKey ? toggleFlag : toggleRank)(Number(card.dataset.index));
  } else if (event.key === "Backspace") {
    state.ranking.pop();
    update();
  } else if (event.key === "Enter" && !$("submit").disabled) {
    $("submit").click();
  } else if (event.key === "s" || event.key === "S") {
    $("skip").click();
  } else {
    return;
  }
  event.preventDefault();
});

load();
