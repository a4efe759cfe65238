// The HTTP API: an optional bearer key, JSON errors {code, detail}, uploads with progress.

const KEY_NAME = "clipsearch.apiKey";

export function getKey() {
  try {
    return localStorage.getItem(KEY_NAME) || "";
  } catch {
    return "";
  }
}

export function setKey(value) {
  try {
    if (value) localStorage.setItem(KEY_NAME, value);
    else localStorage.removeItem(KEY_NAME);
  } catch {
    // storage disabled: the key lasts for this page only
  }
}

function authHeaders() {
  const key = getKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

export class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
    this.detail = detail;
  }
}

function parseError(status, statusText, text) {
  try {
    const body = JSON.parse(text);
    if (body && typeof body.detail === "string") {
      return new ApiError(status, body.code || "http_error", body.detail);
    }
  } catch {
    // not JSON: fall through
  }
  return new ApiError(status, "http_error", `HTTP ${status} ${statusText || ""}`.trim());
}

/** fetch with the key; throws ApiError (with the server's detail) unless the status is 2xx. */
export async function request(path, options = {}) {
  let response;
  try {
    response = await fetch(path, {
      ...options,
      headers: { ...authHeaders(), ...(options.headers || {}) },
    });
  } catch (err) {
    throw new ApiError(0, "network_error", `Network error: ${err.message}`);
  }
  if (!response.ok) {
    throw parseError(response.status, response.statusText, await response.text());
  }
  return response;
}

export async function getJSON(path, options) {
  return (await request(path, options)).json();
}

/** Point an <img> at an API image. Without a key the browser loads (and caches) the URL
 *  itself; with one, the bytes are fetched with the Authorization header. */
export function loadImage(img, url) {
  img.dataset.src = url;
  if (!getKey()) {
    img.src = url;
    return;
  }
  request(url)
    .then((r) => r.blob())
    .then((blob) => {
      if (img.dataset.src !== url) return;
      const objectUrl = URL.createObjectURL(blob);
      img.addEventListener("load", () => URL.revokeObjectURL(objectUrl), { once: true });
      img.src = objectUrl;
    })
    .catch((err) => {
      img.alt = `${img.alt} (not loaded: ${err.detail || err.message})`;
    });
}

/** POST /v1/jobs with repeated `files` fields; onProgress(fraction or null) while sending. */
export function uploadFiles(files, onProgress) {
  const form = new FormData();
  for (const file of files) form.append("files", file, file.name);
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/jobs");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (e) => {
      onProgress(e.lengthComputable ? e.loaded / e.total : null);
    });
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) {
        try {
          resolve(JSON.parse(xhr.responseText));
        } catch {
          reject(new ApiError(xhr.status, "bad_response", "The server's answer was not JSON"));
        }
      } else {
        reject(parseError(xhr.status, xhr.statusText, xhr.responseText));
      }
    });
    xhr.addEventListener("error", () => {
      reject(new ApiError(0, "network_error", "Network error while uploading"));
    });
    xhr.addEventListener("abort", () => reject(new ApiError(0, "aborted", "Upload aborted")));
    xhr.send(form);
  });
}

export function errorText(err) {
  return err instanceof ApiError ? err.detail : String(err && err.message ? err.message : err);
}
