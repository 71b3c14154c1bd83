// The search page's behaviour: the query and the opened clip live in the URL (?q=...&clip=...), so a result page
// can be shared or reloaded; every change goes through render(), which reads the URL and asks the JSON API.
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

function pageUrl(q, clip) {
  const params = new URLSearchParams();
  if (q) params.set("q", q);
  if (clip) params.set("clip", clip);
  const text = params.toString();
  return "/" + (text ? "?" + text : "");
}

function go(q, clip) {
  history.pushState(null, "", pageUrl(q, clip));
  render();
}

function card(hit, q) {
  const image = hit.thumbnail
    ? el("img", {src: hit.thumbnail, alt: "frames of " + hit.id, loading: "lazy"})
    : el("div", {class: "no-thumb"});
  const caption = hit.captions.length ? hit.captions[0] : "";
  const link = el("a", {class: "card", href: pageUrl(q, hit.id), "data-id": hit.id}, image,
    el("div", {class: "meta"},
      el("span", {class: "score"}, hit.score.toFixed(3)),
      el("span", {class: "clip-id"}, hit.id),
      el("div", {class: "caption"}, caption)));
  link.addEventListener("click", (event) => {
    if (event.ctrlKey || event.metaKey || event.shiftKey) return;  // new tab: the URL does the work
    event.preventDefault();
    go(q, hit.id);
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
    $("status").textContent = `${body.results.length} clips for "${body.query}"`;
    results.replaceChildren(...body.results.map((hit) => card(hit, q)));
  } catch (error) {
    $("status").textContent = "error: " + error.message;
  }
}

async function showClip(q, clipId) {
  const detail = $("detail");
  if (!clipId) { detail.hidden = true; return; }
  detail.hidden = false;
  $("detail-id").textContent = clipId;
  $("similar").replaceChildren();
  try {
    const body = await api("/api/similar", {id: clipId, top_k: SIMILAR_K});
    const clip = body.clip;
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
  $("query").value = q;
  document.title = q ? `${q} - clipvip_jax search` : "clipvip_jax search";
  const jobs = [showClip(q, clip)];
  if (q !== shownQuery) { shownQuery = q; jobs.push(showResults(q)); }
  await Promise.all(jobs);
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  go($("query").value.trim(), null);
});
$("detail-close").addEventListener("click", (event) => {
  event.preventDefault();
  go(new URLSearchParams(location.search).get("q") || "", null);
});
window.addEventListener("popstate", render);

api("/api/index", {}).then((info) => {
  $("index-info").textContent = `${info.rows} clips, ${info.kind} model` +
    (info.thumbnails ? "" : " (this index has no thumbnails)");
}).catch(() => {});
render();
