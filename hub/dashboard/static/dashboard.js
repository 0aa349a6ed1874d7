// The dashboard's behaviour, served by the hub itself (no inline script; see the CSP):
// refreshing parts of a page, the live tail of new events, copy buttons and confirmations.
// Every page works without it; it only saves reloads.
"use strict";

(function () {
  const FETCH_HEADERS = { "X-Dashboard-Fetch": "1" };
  const MAX_TAIL_ROWS = 200;

  function get(url) {
    return fetch(url, { headers: FETCH_HEADERS, credentials: "same-origin" }).then(function (r) {
      if (r.status === 401) {
        window.location.reload(); // the session ended: the page asks to sign in
        return null;
      }
      if (r.status === 204 || !r.ok) return null;
      return r.text();
    });
  }

  // <div data-poll-url=... data-poll-every=ms>: its content is replaced by the fragment the
  // URL renders, unless the keyboard focus is inside it (replacing would lose the place).
  // A part marked data-in-flight stops refreshing once the fragment no longer holds one.
  function startPolling(box) {
    const every = parseInt(box.dataset.pollEvery, 10) || 10000;
    const timer = setInterval(function () {
      if (document.hidden || box.contains(document.activeElement)) return;
      get(box.dataset.pollUrl).then(function (html) {
        if (html === null) return;
        box.innerHTML = html;
        if (box.hasAttribute("data-until-settled") && !box.querySelector("[data-in-flight]")) {
          clearInterval(timer);
        }
      }).catch(function () {});
    }, every);
  }

  function startTail(body) {
    const toggle = document.getElementById("tail-toggle");
    const status = document.getElementById("tail-status");
    let on = true;
    let after = body.dataset.tailAfter || "";
    if (toggle) {
      toggle.addEventListener("click", function () {
        on = !on;
        toggle.setAttribute("aria-pressed", on ? "true" : "false");
        toggle.textContent = on ? "Live tail: on" : "Live tail: off";
      });
    }
    setInterval(function () {
      if (!on || document.hidden) return;
      const url = new URL(body.dataset.tailUrl, window.location.href);
      url.searchParams.set("after", after);
      get(url.toString()).then(function (html) {
        if (html === null) return;
        body.insertAdjacentHTML("afterbegin", html);
        const rows = body.querySelectorAll("tr[data-cursor]");
        if (rows.length) after = rows[0].dataset.cursor;
        const empty = document.getElementById("no-events");
        if (empty) empty.remove();
        const fresh = body.querySelectorAll("tr.fresh").length;
        if (status) status.textContent = fresh + " new since this page opened";
        const all = body.querySelectorAll("tr");
        for (let i = MAX_TAIL_ROWS; i < all.length; i++) all[i].remove();
      }).catch(function () {});
    }, 2000);
  }

  // <button data-copy="ID">: copies the text of the element ID (a new key's secret, a curl
  // command). One listener on the document: it also serves parts a poll has replaced.
  function copyButtons() {
    document.addEventListener("click", function (event) {
      const button = event.target.closest ? event.target.closest("button[data-copy]") : null;
      if (!button) return;
      const id = button.dataset.copy;
      const source = document.getElementById(id);
      const said = document.querySelector('[data-copied-for="' + id + '"]');
      const text = source ? source.textContent : "";
      const done = function (message) { if (said) said.textContent = message; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(text).then(
          function () { done("Copied."); },
          function () { done("Select the text and copy it."); }
        );
      } else if (source) {
        const range = document.createRange();
        range.selectNodeContents(source);
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        done(document.execCommand("copy") ? "Copied." : "Selected: copy it now.");
      }
    });
  }

  function confirmations() {
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.dataset.confirm)) event.preventDefault();
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-poll-url]").forEach(startPolling);
    const tail = document.querySelector("tbody[data-tail-url]");
    if (tail) startTail(tail);
    copyButtons();
    confirmations();
  });
})();
