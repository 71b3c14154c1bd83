// The search page's behaviour: the query and the opened clip live in the URL (?q=...&clip=... or &row=... for a
// moment), so a result page can be shared or reloaded; every change goes through render(), which reads the URL and
// asks the JSON API. A moment (an index of windows) shows its time range, where it falls on its video's time line,
// and, when the service serves the video file, a link that opens it at the moment's start.
"use strict";

const TOP_K = 24;
const SIMILAR_K = 12;
const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

async function api(path, params) {
  const response = await fetch(path + "?" + new URLSearchParams(params));
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function pageUrl(q, clip, row) {
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if (row !== null && row !== undefined) params.set("row", String(row));
  else if (clip) params.set("clip", clip);
  const text = params.toString();
  return "/" + (text ? "?" + text : "");
}

function go(q, clip, row) {
  history.pushState(null, "", pageUrl(q, clip, row));
  render();
}

function clock(seconds) {
  const m = Math.floor(seconds / 60), s = seconds - 60 * m;
  return `${m}:${s < 10 ? "0" : ""}${s.toFixed(1)}`;
}

// The moment's parts: its time range, a bar of the video's time line with the moment marked, and the link that
// opens the video at its start (only when the service serves the file: hit.video).
function momentParts(hit) {
  if (hit.start === null || hit.start === undefined) return [];
  const parts = [el("span", {class: "time-range"}, `${clock(hit.start)}-${clock(hit.end)}`)];
  if (hit.duration) {
    const mark = el("span", {class: "timeline-mark"});
    mark.style.left = `${(100 * hit.start / hit.duration).toFixed(2)}%`;
    mark.style.width = `${Math.max(1, 100 * (hit.end - hit.start) / hit.duration).toFixed(2)}%`;
    parts.push(el("span", {class: "timeline", title: `${clock(hit.start)} of ${clock(hit.duration)}`}, mark));
  }
  if (hit.video) parts.push(el("a", {class: "open-video", href: hit.video, target: "_blank", rel: "noopener"},
                               `open at ${clock(hit.start)}`));
  return parts;
}

function card(hit, q) {
  const image = hit.thumbnail
    ? el("img", {src: hit.thumbnail, alt: "frames of " + hit.id, loading: "lazy"})
    : el("div", {class: "no-thumb"});
  const caption = hit.captions.length ? hit.captions[0] : "";
  const moment = hit.start !== null && hit.start !== undefined;
  const link = el("a", {class: "card", href: pageUrl(q, hit.id, moment ? hit.row : null), "data-id": hit.id,
                        "data-row": String(hit.row)}, image,
    el("div", {class: "meta"},
      el("span", {class: "score"}, hit.score.toFixed(3)),
      el("span", {class: "clip-id"}, hit.id),
      ...momentParts(hit),
      el("div", {class: "caption"}, caption)));
  link.addEventListener("click", (event) => {
    if (event.target.classList.contains("open-video")) return;  // the video opens in its own tab
    if (event.ctrlKey || event.metaKey || event.shiftKey) return;  // new tab: the URL does the work
    event.preventDefault();
    go(q, hit.id, moment ? hit.row : null);
  });
  return link;
}

async function showResults(q) {
  const results = $("results");
  results.replaceChildren();
  if (!q) { $("status").textContent = "Type a sentence to find the clips it describes."; return; }
  $("status").textContent = "searching...";
  try {
    const body = await api("/api/search", {q, top_k: TOP_K});
    const what = body.results.some((hit) => hit.start !== null) ? "moments" : "clips";
    $("status").textContent = `${body.results.length} ${what} for "${body.query}"`;
    results.replaceChildren(...body.results.map((hit) => card(hit, q)));
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  }
}

async function showClip(q, clipId, row) {
  const detail = $("detail");
  if (!clipId && row === null) { detail.hidden = true; return; }
  detail.hidden = false;
  $("detail-id").textContent = clipId || "";
  $("detail-moment").replaceChildren();
  $("similar").replaceChildren();
  try {
    const body = await api("/api/similar", row !== null ? {row, top_k: SIMILAR_K} : {id: clipId, top_k: SIMILAR_K});
    const clip = body.clip;
    $("detail-id").textContent = clip.id;
    $("detail-moment").replaceChildren(...momentParts(clip));
    const frames = $("detail-frames");
    frames.hidden = !clip.thumbnail;
    if (clip.thumbnail) frames.src = clip.thumbnail;
    $("detail-captions").replaceChildren(...clip.captions.map((c) => el("li", {}, c)));
    $("similar").replaceChildren(...body.results.map((hit) => card(hit, q)));
    detail.scrollIntoView({block: "start"});
  } catch (error) {
    $("detail-captions").replaceChildren(el("li", {}, "error: " + error.message));
  }
}

let shownQuery = null;

async function render() {
  const params = new URLSearchParams(location.search);
  const q = (params.get("q") || "").trim();
  const clip = params.get("clip");
  const rowText = params.get("row");
  const row = rowText !== null && /^[0-9]+$/.test(rowText) ? Number(rowText) : null;
  $("query").value = q;
  document.title = q ? `${q} - clipvip_jax search` : "clipvip_jax search";
  const jobs = [showClip(q, clip, row)];
  if (q !== shownQuery) { shownQuery = q; jobs.push(showResults(q)); }
  await Promise.all(jobs);
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  go($("query").value.trim(), null, null);
});
$("detail-close").addEventListener("click", (event) => {
  event.preventDefault();
  go(new URLSearchParams(location.search).get("q") || "", null, null);
});
window.addEventListener("popstate", render);

api("/api/index", {}).then((info) => {
  $("index-info").textContent = `${info.rows} ${info.moments ? "moments" : "clips"}, ${info.kind} model` +
    (info.thumbnails ? "" : " (this index has no thumbnails)");
}).catch(() => {});
render();
