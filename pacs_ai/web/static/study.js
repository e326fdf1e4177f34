// Review buttons: POST the review as JSON to the API, then reload to show state and history.
"use strict";

(function () {
  const study = document.getElementById("study");
  if (!study) return;
  const url = "/api/studies/" + encodeURIComponent(study.dataset.studyId) + "/reviews";
  const errorBox = document.getElementById("review-error");
  const comment = document.getElementById("comment");

  async function send(button) {
    const body = { action: button.dataset.action, comment: comment ? comment.value : "" };
    if (button.dataset.job) body.job_id = Number(button.dataset.job);
    if (button.dataset.finding) body.finding = button.dataset.finding;
    if (body.action === "comment" && !body.comment.trim()) {
      errorBox.textContent = "Write the comment in the box first.";
      if (comment) comment.focus();
      return;
    }
    for (const b of document.querySelectorAll("button.review")) b.disabled = true;
    try {
      const response = await fetch(url, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "Accept": "application/json" },
        body: JSON.stringify(body),
      });
      if (!response.ok) {
        let detail = "HTTP " + response.status;
        try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
        throw new Error(typeof detail === "string" ? detail : JSON.stringify(detail));
      }
      window.location.reload();
    } catch (err) {
      errorBox.textContent = "Review not saved: " + err.message;
      for (const b of document.querySelectorAll("button.review")) b.disabled = false;
    }
  }

  for (const button of document.querySelectorAll("button.review")) {
    button.addEventListener("click", () => send(button));
  }
})();
