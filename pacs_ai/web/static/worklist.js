// Live worklist: re-reads /api/worklist every data-refresh-s seconds and redraws the rows.
// Every value goes in with textContent, never innerHTML: patient data is not markup.
"use strict";

(function () {
  const table = document.getElementById("worklist");
  if (!table) return;
  const api = table.dataset.api;
  const every = Math.max(1, Number(table.dataset.refreshS) || 10) * 1000;
  const body = table.tBodies[0];

  function pad(n) { return String(n).padStart(2, "0"); }
  function when(seconds) {
    const d = new Date(seconds * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) +
      " " + pad(d.getHours()) + ":" + pad(d.getMinutes());
  }
  function dicomDate(v) {
    return v && v.length === 8 ? v.slice(0, 4) + "-" + v.slice(4, 6) + "-" + v.slice(6) : v || "";
  }
  function person(v) {
    const parts = (v || "").split("=")[0].split("^");
    const given = parts.slice(1).join(" ").trim();
    return given ? parts[0] + ", " + given : parts[0];
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function cell(row, text) { row.appendChild(el("td", "", text)); }

  function render(item) {
    const prio = (item.priority || "none").toLowerCase();
    const tr = el("tr", "study prio-" + prio);
    tr.dataset.studyId = item.study_id;
    const p = el("td");
    p.appendChild(el("span", "badge prio " + prio, item.priority || "–"));
    tr.appendChild(p);
    cell(tr, when(item.received_at));
    const name = el("td");
    const link = el("a", "open", person(item.patient_name) || "(no name)");
    link.href = "/studies/" + encodeURIComponent(item.study_id);
    name.appendChild(link);
    tr.appendChild(name);
    cell(tr, item.patient_id);
    cell(tr, item.accession_number);
    cell(tr, item.modality);
    cell(tr, item.study_description);
    cell(tr, dicomDate(item.study_date));
    const ai = el("td", "ai");
    for (const job of item.ai) {
      const badge = el("span", "badge ai " + job.state, job.model + ": " + job.state);
      badge.title = job.reason || "";
      ai.appendChild(badge);
    }
    tr.appendChild(ai);
    tr.appendChild(el("td", "summary", item.findings_summary));
    const review = el("td");
    const state = item.review_state.toLowerCase();
    review.appendChild(el("span", "badge review " + state, state));
    tr.appendChild(review);
    return tr;
  }

  async function refresh() {
    const status = document.getElementById("refresh-error");
    try {
      const response = await fetch(api, { credentials: "same-origin", cache: "no-store" });
      if (response.status === 401) {
        window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
        return;
      }
      if (!response.ok) throw new Error("HTTP " + response.status);
      const page = await response.json();
      body.replaceChildren(...page.items.map(render));
      document.getElementById("total").textContent = page.total;
      document.getElementById("first").textContent = page.items.length ? page.offset + 1 : 0;
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
      status.textContent = "";
    } catch (err) {
      status.textContent = "refresh failed (" + err.message + "); retrying";
    }
  }

  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  setInterval(refresh, every);
})();
