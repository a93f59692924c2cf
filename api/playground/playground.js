// The playground: builds a generation request, submits it to the job API and follows the job's
// Server-Sent Events (read with fetch, since EventSource cannot send the API key).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "t2i-playground-key";
const TERMINAL = new Set(["succeeded", "failed", "canceled", "expired"]);
let currentJob = null;
let stream = null;
// The models of `GET /v1/models`: each one's family sizes set the size inputs when it is chosen.
let models = [];

function headers() {
  return { Authorization: `Bearer ${$("api-key").value.trim()}`, "Content-Type": "application/json" };
}

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: headers(),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = answer.error || {};
    throw new Error(`${response.status} ${error.type || ""}: ${error.message || response.statusText}`);
  }
  return answer;
}

function fillSelect(select, values, keepFirst = true) {
  const first = keepFirst ? select.options[0] : null;
  select.replaceChildren(...(first ? [first] : []));
  for (const value of values) select.add(new Option(value, value));
}

async function loadOptions() {
  const info = await fetch("/info").then((r) => r.json()).catch(() => null);
  if (info) {
    fillSelect($("scheduler"), info.schedulers, false);
  }
  if (!$("api-key").value.trim()) return;
  try {
    models = (await api("GET", "/v1/models")).data;
    fillSelect($("model"), models.map((m) => m.id));
    useModelSizes();
    fillSelect($("control-type"), [...new Set(models.flatMap((m) => m.control_types))].sort());
    fillSelect($("lora"), (await api("GET", "/v1/loras")).data.map((l) => l.name));
  } catch (error) {
    $("error").textContent = `could not list models and adapters: ${error.message}`;
  }
}

// The chosen model's (or the default model's) family sizes: its default and its bounds.
function useModelSizes() {
  const model = models.find((m) => ($("model").value ? m.id === $("model").value : m.default));
  if (!model || !model.width) return;
  for (const [id, defaultSize, bounds] of [
    ["width", model.default_width, model.width],
    ["height", model.default_height, model.height],
  ]) {
    Object.assign($(id), { min: bounds.minimum, max: bounds.maximum, step: bounds.multiple_of });
    $(id).value = defaultSize;
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function buildRequest() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    width: number("width"),
    height: number("height"),
    num_inference_steps: number("steps"),
    guidance_scale: number("guidance"),
    scheduler: $("scheduler").value || "dpmpp_2m",
  };
  if ($("seed").value !== "") body.seed = number("seed");
  if (number("preview-every") > 0) body.preview = { every_n_steps: number("preview-every") };
  if ($("model").value) body.model = $("model").value;
  if ($("lora").value) body.loras = [{ name: $("lora").value, scale: number("lora-scale") }];
  const controlFile = $("control-image").files[0];
  if ($("control-type").value && controlFile) {
    body.control = {
      type: $("control-type").value,
      image: await readFile(controlFile),
      conditioning_scale: number("control-scale"),
      preprocess: $("control-preprocess").checked,
    };
  }
  return body;
}

function curlCommand(body) {
  const shown = structuredClone(body);
  if (shown.control) shown.control.image = "<base64 of your control image>";
  const json = JSON.stringify(shown).replaceAll("'", "'\\''");
  return [
    `curl -sS -X POST '${location.origin}/v1/jobs'`,
    `  -H "Authorization: Bearer $T2I_API_KEY"`,
    `  -H 'Content-Type: application/json'`,
    `  -d '${json}'`,
  ].join(" \\\n");
}

function showStatus(status, position) {
  $("status").textContent = status;
  $("queue-position").textContent =
    status === "queued" && position !== null && position !== undefined
      ? `(queue position ${position})`
      : "";
  $("cancel").disabled = TERMINAL.has(status) || status === "idle";
}

function showProgress(progress) {
  if (!progress) return;
  $("progress").max = progress.total;
  $("progress").value = progress.step;
  const eta = progress.eta_s ? `, about ${progress.eta_s.toFixed(1)} s left` : "";
  $("progress-text").textContent = `step ${progress.step} of ${progress.total}${eta}`;
}

function showJob(job) {
  showStatus(job.status, job.queue_position);
  showProgress(job.progress);
  if (job.error) $("error").textContent = `${job.error.type}: ${job.error.message}`;
  if (TERMINAL.has(job.status)) $("preview").hidden = true;
  if (job.status === "succeeded") {
    $("images").replaceChildren(
      ...job.images.map((image) => {
        const img = document.createElement("img");
        img.alt = image.filtered ? "filtered by the safety checker" : `seed ${image.seed}`;
        if (image.url) img.src = image.url;
        img.width = image.width;
        img.height = image.height;
        return img;
      }),
    );
  }
}

function handleEvent(name, data) {
  if (name === "position") showStatus("queued", data.queue_position);
  else if (name === "started") showStatus("running");
  else if (name === "progress") {
    showStatus("running");
    showProgress(data);
  } else if (name === "preview") {
    // The render so far: it sharpens as the steps go by.
    $("preview").src = data.image;
    $("preview").dataset.step = data.step;
    $("preview").hidden = false;
  } else if (TERMINAL.has(name)) showJob(data);
  else if (name === "error") $("error").textContent = data.message || JSON.stringify(data);
}

async function follow(jobId) {
  stream = new AbortController();
  const response = await fetch(`/v1/jobs/${jobId}/events`, { headers: headers(), signal: stream.signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trim());
      }
      if (data.length) handleEvent(name, JSON.parse(data.join("\n")));
    }
  }
}

async function submit(event) {
  event.preventDefault();
  if (stream) stream.abort();
  $("error").textContent = "";
  $("images").replaceChildren();
  $("preview").hidden = true;
  $("preview").removeAttribute("src");
  $("progress").value = 0;
  $("progress-text").textContent = "";
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  try {
    const body = await buildRequest();
    $("curl").textContent = curlCommand(body);
    showStatus("submitting");
    const job = await api("POST", "/v1/jobs", body);
    currentJob = job.id;
    showJob(job);
    if (!TERMINAL.has(job.status)) await follow(job.id);
  } catch (error) {
    if (error.name === "AbortError") return;
    showStatus("idle");
    $("error").textContent = error.message;
  }
}

async function cancel() {
  if (!currentJob) return;
  try {
    showJob(await api("POST", `/v1/jobs/${currentJob}/cancel`));
  } catch (error) {
    $("error").textContent = error.message;
  }
}

$("request").addEventListener("submit", submit);
$("cancel").addEventListener("click", cancel);
$("copy-curl").addEventListener("click", () => navigator.clipboard.writeText($("curl").textContent));
$("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
$("api-key").addEventListener("change", loadOptions);
$("model").addEventListener("change", useModelSizes);
loadOptions();
