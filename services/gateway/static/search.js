// Text search, image-to-image search ("more like this"), the result grid and the lightbox.

import { errorText, getJSON, loadImage, request } from "./api.js";
import { el } from "./dom.js";

const THUMB_SIZE = 256;

export function initSearch() {
  const form = document.getElementById("search-form");
  const input = document.getElementById("search-input");
  const kInput = document.getElementById("search-k");
  const status = document.getElementById("search-status");
  const error = document.getElementById("search-error");
  const grid = document.getElementById("results");
  const lightbox = initLightbox();
  let seq = 0; // only the newest search may draw its answer

  function k() {
    const n = Number.parseInt(kInput.value, 10);
    return Number.isFinite(n) ? Math.min(Math.max(n, 1), 200) : 24;
  }

  async function run(kind, label, ask) {
    const mine = ++seq;
    error.hidden = true;
    grid.setAttribute("aria-busy", "true");
    status.textContent = `Searching for ${label}…`;
    try {
      const body = await ask();
      if (mine !== seq) return;
      render(body, kind);
    } catch (err) {
      if (mine !== seq) return;
      status.textContent = "";
      error.textContent = errorText(err);
      error.hidden = false;
    } finally {
      if (mine === seq) grid.removeAttribute("aria-busy");
    }
  }

  function render(body, kind) {
    const hits = body.hits || [];
    grid.replaceChildren(...hits.map(card));
    grid.dataset.kind = kind;
    grid.dataset.query = body.query;
    const what = kind === "image" ? `images like ${body.query}` : `“${body.query}”`;
    status.textContent =
      `${hits.length} result${hits.length === 1 ? "" : "s"} for ${what} ` +
      `in ${Math.round(body.took_ms)} ms (${body.model})`;
  }

  function card(hit) {
    const name = hit.filename || hit.image_id.slice(0, 12);
    const li = el("li", {
      className: "result",
      "data-testid": "result",
      "data-image-id": hit.image_id,
      "data-filename": hit.filename || "",
    });

    const open = el("button", {
      type: "button",
      className: "thumb",
      "data-testid": "result-open",
      "aria-label": `Open ${name}`,
    });
    const img = el("img", {
      alt: name,
      loading: "lazy",
      decoding: "async",
      "data-testid": "result-thumb",
    });
    loadImage(img, `/v1/images/${hit.image_id}/thumbnail?size=${THUMB_SIZE}`);
    open.append(img);
    open.addEventListener("click", () => lightbox.show(hit.image_url, name));

    const meta = el("div", { className: "meta" });
    meta.append(
      el("span", { className: "filename", title: name, "data-testid": "result-filename", text: name }),
      el("span", {
        className: "score",
        title: "cosine similarity",
        "data-testid": "result-score",
        text: hit.score.toFixed(3),
      }),
    );

    const more = el("button", {
      type: "button",
      className: "more",
      "data-testid": "more-like-this",
      "aria-label": `More like ${name}`,
      text: "More like this",
    });
    more.addEventListener("click", () => moreLike(hit, name));

    li.append(open, meta, more);
    return li;
  }

  function moreLike(hit, name) {
    run("image", name, async () => {
      const blob = await (await request(hit.image_url)).blob();
      const body = new FormData();
      body.append("file", blob, name);
      return getJSON(`/v1/search/image?k=${k()}`, { method: "POST", body });
    });
  }

  form.addEventListener("submit", (e) => {
    e.preventDefault();
    const q = input.value.trim();
    if (!q) return;
    const params = new URLSearchParams({ q, k: String(k()) });
    run("text", `“${q}”`, () => getJSON(`/v1/search?${params}`));
  });
}

function initLightbox() {
  const dialog = document.getElementById("lightbox");
  const img = document.getElementById("lightbox-image");
  const caption = document.getElementById("lightbox-caption");
  const link = document.getElementById("lightbox-link");
  document.getElementById("lightbox-close").addEventListener("click", () => dialog.close());
  // A click on the backdrop (the dialog itself, outside its content) closes it.
  dialog.addEventListener("click", (e) => {
    if (e.target === dialog) dialog.close();
  });
  dialog.addEventListener("close", () => {
    img.removeAttribute("src");
    delete img.dataset.src;
  });
  return {
    show(url, name) {
      img.alt = name;
      caption.textContent = name;
      link.href = url;
      loadImage(img, url);
      dialog.showModal();
    },
  };
}
