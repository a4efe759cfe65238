// The page's entry point: the API key field, search, uploads and jobs.

import { getKey, setKey } from "./api.js";
import { initJobs, initUpload } from "./jobs.js";
import { initSearch } from "./search.js";

const keyInput = document.getElementById("api-key");
keyInput.value = getKey();

const jobs = initJobs();
initSearch();
initUpload(jobs);

keyInput.addEventListener("change", () => {
  setKey(keyInput.value.trim());
  jobs.refresh();
});

// A file dropped outside the drop zone must not navigate away from the page.
for (const type of ["dragover", "drop"]) {
  window.addEventListener(type, (e) => {
    if (!e.defaultPrevented) e.preventDefault();
  });
}
