// distillery browser review: keys and buttons on the answer page. Plain JavaScript, no dependency, no network
// access beyond this server. Every label is a POST to /api/label carrying the token in a header; the undo
// stack lives in this tab's sessionStorage (a reload keeps it), the labels themselves in the run folder.
"use strict";

(function () {
  const token = document.querySelector('meta[name="review-token"]').content;
  const answer = document.getElementById("answer");
  const message = document.getElementById("message");
  const UNDO = "distillery-undo:" + location.port;

  function say(text) {
    message.textContent = text;
    message.classList.toggle("shown", Boolean(text));
  }

  function stack() {
    try { return JSON.parse(sessionStorage.getItem(UNDO) || "[]"); } catch (e) { return []; }
  }

  function save(items) { sessionStorage.setItem(UNDO, JSON.stringify(items)); }

  async function post(body) {
    const response = await fetch("/api/label", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Review-Token": token},
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) { throw new Error(data.error || ("HTTP " + response.status)); }
    return data;
  }

  function go(url) { if (url) { location.href = url; } }

  let busy = false;
  async function act(key) {
    if (!answer || busy) { return; }
    const rid = answer.dataset.responseId;
    const note = document.getElementById("note");
    busy = true;
    try {
      if (key === "c" || key === "i") {
        const result = await post({response_id: rid, is_correct: key === "c", note: note.value || null});
        save(stack().concat([{response_id: rid, url: location.pathname + location.search, before: result.before}]));
        if (answer.dataset.next) { go(answer.dataset.next); } else { sessionStorage.setItem(UNDO + ":msg", "labelled; that was the last answer"); location.reload(); }
      } else if (key === "u") {
        const items = stack();
        const step = items.pop();
        if (!step) { say("nothing to undo"); return; }
        await post({response_id: step.response_id, is_correct: step.before.is_correct, note: step.before.note, action: "undo"});
        save(items);
        sessionStorage.setItem(UNDO + ":msg", "undone");
        if (step.url === location.pathname + location.search) { location.reload(); } else { go(step.url); }
      } else if (key === "s" || key === "j") {
        if (answer.dataset.next) { go(answer.dataset.next); } else { say("that was the last answer"); }
      } else if (key === "k") {
        if (answer.dataset.previous) { go(answer.dataset.previous); } else { say("this is the first answer"); }
      } else if (key === "n") {
        note.focus();
        note.select();
      }
    } catch (err) {
      say("not saved: " + err.message);
    } finally {
      busy = false;
    }
  }

  async function saveNote(event) {
    event.preventDefault();
    const note = document.getElementById("note");
    const current = JSON.parse(answer.dataset.isCorrect);
    try {
      const result = await post({response_id: answer.dataset.responseId, is_correct: current, note: note.value || null});
      save(stack().concat([{response_id: answer.dataset.responseId, url: location.pathname + location.search, before: result.before}]));
      sessionStorage.setItem(UNDO + ":msg", "note saved");
      location.reload();
    } catch (err) {
      say("not saved: " + err.message);
    }
  }

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) { return; }
    if (target.closest && target.closest("input, textarea, select")) {
      if (event.key === "Escape") { target.blur(); }
      return;
    }
    const key = event.key.toLowerCase();
    if ("cisunjk".includes(key) && key.length === 1 && answer) {
      event.preventDefault();
      act(key);
    }
  });

  document.querySelectorAll("button[data-key]").forEach((button) => {
    button.addEventListener("click", () => act(button.dataset.key));
  });

  const form = document.getElementById("note-form");
  if (form) { form.addEventListener("submit", saveNote); }

  const pending = sessionStorage.getItem(UNDO + ":msg");
  if (pending) { sessionStorage.removeItem(UNDO + ":msg"); say(pending); }

  const filters = document.getElementById("filters");
  if (filters) {  // the list: a changed filter applies at once
    filters.querySelectorAll("input[type=checkbox], select").forEach((el) => {
      el.addEventListener("change", () => filters.requestSubmit());
    });
  }
})();
