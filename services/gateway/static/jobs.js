// Uploads (drag-and-drop or file picker), per-job progress, and the job list.

import { errorText, getJSON, uploadFiles } from "./api.js";
import { el } from "./dom.js";

const FINAL = new Set(["succeeded", "completed_with_errors", "failed", "cancelled"]);
const POLL_MS = 500;
const LIST_MS = 2000;

export function isFinal(state) {
  return FINAL.has(state);
}

function summary(job) {
  const parts = [`${job.done} of ${job.total} indexed`];
  if (job.duplicates) parts.push(`${job.duplicates} already indexed`);
  if (job.failed) parts.push(`${job.failed} failed`);
  if (!isFinal(job.state) && job.eta_seconds != null) {
    parts.push(`about ${Math.ceil(job.eta_seconds)} s left`);
  }
  return parts.join(" · ");
}

function errorList(errors, label) {
  const list = el("ul", { className: "errors" });
  for (const e of errors) {
    const name = el("strong", { text: e.filename });
    list.append(el("li", {}, name, ` — ${e.detail} `, el("code", { text: e.code })));
  }
  return el("details", { "data-testid": "job-errors" }, el("summary", { text: label }), list);
}

/** One job's row: id, state, a progress bar, counters and its per-item errors (expandable). */
function jobView(job, testid, expanded) {
  const id = job.job_id;
  const head = el(
    "div",
    { className: "job-head" },
    el("code", { text: id.slice(0, 8), title: id }),
    el("span", {
      className: `state state-${job.state}`,
      "data-testid": "job-state",
      text: job.state.replaceAll("_", " "),
    }),
  );
  const progress = el("progress", {
    max: 1,
    value: job.progress ?? 0,
    "aria-label": `Job ${id.slice(0, 8)} progress`,
  });
  const counts = el("p", { className: "job-counts", "data-testid": "job-counts", text: summary(job) });
  const node = el(
    "li",
    {
      className: "job",
      "data-testid": testid,
      "data-job-id": id,
      "data-state": job.state,
      "data-final": String(isFinal(job.state)),
    },
    head,
    progress,
    counts,
  );
  if (job.errors && job.errors.length) {
    const shown = job.errors.length;
    const failed = Math.max(job.failed, shown);
    const label = shown < failed ? `Errors (first ${shown} of ${failed})` : `Errors (${shown})`;
    const details = errorList(job.errors, label);
    details.open = expanded;
    node.append(details);
  }
  return node;
}

export function initJobs() {
  const list = document.getElementById("job-list");
  const listError = document.getElementById("jobs-error");
  const openErrors = new Set(); // job ids whose error lists the user expanded
  let timer = null;
  let loading = false;
  let trackedActive = 0;

  list.addEventListener("toggle", (e) => {
    const id = e.target.closest("[data-job-id]")?.dataset.jobId;
    if (!id) return;
    if (e.target.open) openErrors.add(id);
    else openErrors.delete(id);
  }, true);

  async function refresh() {
    clearTimeout(timer);
    timer = null;
    if (loading) return;
    loading = true;
    let active = trackedActive > 0;
    try {
      const { jobs } = await getJSON("/v1/jobs?limit=50");
      list.replaceChildren(...jobs.map((j) => jobView(j, "job-row", openErrors.has(j.job_id))));
      if (!jobs.length) list.append(el("li", { className: "empty", text: "No jobs yet." }));
      listError.hidden = true;
      active ||= jobs.some((j) => !isFinal(j.state));
    } catch (err) {
      listError.textContent = errorText(err);
      listError.hidden = false;
    } finally {
      loading = false;
    }
    if (active) timer = setTimeout(refresh, LIST_MS);
  }

  document.getElementById("jobs-refresh").addEventListener("click", refresh);
  refresh();
  return {
    refresh,
    started() {
      trackedActive += 1;
      refresh();
    },
    finished() {
      trackedActive -= 1;
      refresh();
    },
  };
}

export function initUpload(jobs) {
  const zone = document.getElementById("dropzone");
  const input = document.getElementById("file-input");
  const box = document.getElementById("upload");
  const label = document.getElementById("upload-label");
  const bar = document.getElementById("upload-progress");
  const error = document.getElementById("upload-error");
  const tracked = document.getElementById("tracked-jobs");

  async function send(files) {
    if (!files.length) return;
    error.hidden = true;
    box.hidden = false;
    box.querySelector("[data-testid=upload-rejected]")?.remove();
    bar.value = 0;
    const what = `${files.length} file${files.length === 1 ? "" : "s"}`;
    label.textContent = `Uploading ${what}…`;
    try {
      const body = await uploadFiles(files, (fraction) => {
        if (fraction === null) bar.removeAttribute("value");
        else {
          bar.value = fraction;
          label.textContent = `Uploading ${what}… ${Math.round(fraction * 100)}%`;
        }
      });
      bar.value = 1;
      const rejected = body.rejected || [];
      label.textContent =
        `Uploaded ${what}: ${body.total} item${body.total === 1 ? "" : "s"} in the job` +
        (rejected.length ? `, ${rejected.length} rejected` : "");
      if (rejected.length) {
        const list = errorList(rejected, `Rejected (${rejected.length})`);
        list.dataset.testid = "upload-rejected";
        box.append(list);
      }
      track(body);
    } catch (err) {
      box.hidden = true;
      error.textContent = errorText(err);
      error.hidden = false;
    }
  }

  function track(submitted) {
    const id = submitted.job_id;
    let node = el("li", {
      className: "job",
      "data-testid": "job-progress",
      "data-job-id": id,
      text: `Job ${id.slice(0, 8)} queued…`,
    });
    tracked.prepend(node);
    jobs.started();

    const poll = async () => {
      let job;
      try {
        job = await getJSON(submitted.status_url || `/v1/jobs/${id}`);
      } catch (err) {
        if (err.status === 404) {
          node.dataset.final = "true";
          node.textContent = `Job ${id.slice(0, 8)}: ${errorText(err)}`;
          jobs.finished();
          return;
        }
        node.title = errorText(err);
        setTimeout(poll, POLL_MS * 4); // keep trying while the gateway is unreachable
        return;
      }
      const wasOpen = node.querySelector("details[data-testid=job-errors]")?.open ?? false;
      const next = jobView(job, "job-progress", wasOpen);
      node.replaceWith(next);
      node = next;
      if (isFinal(job.state)) jobs.finished();
      else setTimeout(poll, POLL_MS);
    };
    poll();
  }

  input.addEventListener("change", () => {
    send([...input.files]);
    input.value = "";
  });
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", (e) => {
    if (!zone.contains(e.relatedTarget)) zone.classList.remove("over");
  });
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    send([...e.dataTransfer.files]);
  });
}
