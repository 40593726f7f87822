// The circuitsearch page: draws the views that Python laid out (graphs/page.py) and reacts to the reader.
// No library and no network: the data sits in the page, in <script id="page-data">.
(function () {
  "use strict";
  const DATA = JSON.parse(document.getElementById("page-data").textContent);
  const SVGNS = "http://www.w3.org/2000/svg";
  const INPUT_COLOURS = { q: "#1f77b4", k: "#2ca02c", v: "#d62728", "": "#555555" };
  const INPUT_NAMES = { q: "query (q)", k: "key (k)", v: "value (v)", "": "MLP / logits input" };
  const HANG = { q: -0.3, k: 0, v: 0.3, "": 0 };  // where a head's q, k and v inputs meet it (fraction of its width)
  const $ = (id) => document.getElementById(id);

  let view = null;
  let nodeEls = [], edgeEls = [];
  let visibleNode = [], visibleEdge = [];
  const state = { inputs: { q: true, k: true, v: true, "": true }, circuits: [], point: -1, search: "",
                  colour: "input", picked: null };

  function svg(tag, attrs, parent) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }

  function div(text, parent, cls) {
    const d = document.createElement("div");
    d.textContent = text;
    if (cls) d.className = cls;
    if (parent) parent.appendChild(d);
    return d;
  }

  // ---- drawing --------------------------------------------------------------------------------------
  function edgePath(e) {
    const s = view.nodes[e.s], t = view.nodes[e.t];
    const x1 = s.x, y1 = s.y - s.h / 2;                       // the sender's top
    const x2 = t.x + HANG[e.i] * t.w, y2 = t.y + t.h / 2;     // the receiver's bottom (at q, k or v)
    const dx = x2 - x1, dy = y2 - y1, len = Math.hypot(dx, dy) || 1;
    const bow = 0.12 * len;                                   // bowed, so edges along a column do not hide
    const cx = (x1 + x2) / 2 - (dy / len) * bow, cy = (y1 + y2) / 2 + (dx / len) * bow;
    return `M${x1.toFixed(1)},${y1.toFixed(1)} Q${cx.toFixed(1)},${cy.toFixed(1)} ${x2.toFixed(1)},${y2.toFixed(1)}`;
  }

  function edgeColour(e) {
    return state.colour === "sets" && e.c ? e.c : INPUT_COLOURS[e.i];
  }

  function drawView(v) {
    view = v;
    state.picked = null;
    const g = $("graph");
    g.textContent = "";
    g.setAttribute("viewBox", `0 0 ${v.width} ${v.height}`);
    g.classList.remove("focus", "searching");
    const edges = svg("g", { id: "edges" }, g), nodes = svg("g", { id: "nodes" }, g);
    for (const [name, x, y] of v.slots) svg("text", { x: x, y: y, class: "slot" }, g).textContent = name;
    // strongest edges last, on top
    const order = v.edges.map((e, i) => i).sort((a, b) => v.edges[a].w - v.edges[b].w);
    edgeEls = new Array(v.edges.length);
    for (const i of order) {
      const e = v.edges[i];
      edgeEls[i] = svg("path", { d: edgePath(e), class: "edge" + (e.extra ? " extra" : ""), "data-unit": e.u, "data-i": i, "data-input": e.i,
                                 stroke: edgeColour(e), "stroke-width": e.w, "stroke-opacity": e.o }, edges);
    }
    nodeEls = v.nodes.map((n, i) => {
      const attrs = { class: "node" + (n.ghost ? " ghost" : "") + (n.extra ? " extra" : ""), "data-i": i, transform: `translate(${n.x},${n.y})` };
      attrs[n.ghost ? "data-ghost" : "data-unit"] = n.u;
      const el = svg("g", attrs, nodes);
      const shape = { fill: n.fill, stroke: "#444", "stroke-width": n.pen };
      if (n.k === "head") svg("ellipse", { rx: n.w / 2, ry: n.h / 2, ...shape }, el);
      else svg("rect", { x: -n.w / 2, y: -n.h / 2, width: n.w, height: n.h, rx: n.k === "mlp" ? 0 : 6, ...shape }, el);
      svg("text", n.tc ? { fill: n.tc } : {}, el).textContent = n.label;
      return el;
    });
    buildAdjacency();
    $("caption").textContent = "";
    for (const line of v.caption) div(line, $("caption"));
    $("notes").textContent = "";
    for (const line of v.notes) div(line, $("notes"));
    drawLegend(v);
    drawCircuitToggles(v);
    setUpCurve(v);
    fit();
    update();
  }

  // "fit the window" shrinks a large view to the window, but never below MIN_SCALE (labels stay legible;
  // the canvas scrolls past that); "100 %" draws it at its own size
  const MIN_SCALE = 0.6;
  function fit() {
    const g = $("graph"), c = $("canvas");
    let s = 1;
    if ($("zoom").value === "fit") {
      s = Math.min(1, (c.clientWidth - 4) / view.width, (window.innerHeight - 190) / view.height);
      s = Math.max(s, MIN_SCALE);
    }
    g.setAttribute("width", (view.width * s).toFixed(1));
    g.setAttribute("height", (view.height * s).toFixed(1));
  }

  function drawLegend(v) {
    const box = $("legend");
    box.textContent = "";
    if (v.edges.length) {
      for (const i of ["q", "k", "v", ""]) {
        const d = div("", box);
        const s = document.createElement("span");
        s.className = "line";
        s.style.borderColor = INPUT_COLOURS[i];
        d.appendChild(s);
        d.appendChild(document.createTextNode("edge into " + INPUT_NAMES[i]));
      }
    }
    for (const [colour, text] of v.legend) {
      const d = div("", box);
      const s = document.createElement("span");
      s.className = "swatch";
      s.style.background = colour;
      d.appendChild(s);
      d.appendChild(document.createTextNode(text));
    }
    div("ellipse: attention head; box: MLP; rounded: embedding and logits. Edges run up, from sender to receiver.",
        box);
    if (v.nodes.some((n) => n.ghost)) div("dashed outline: a head ablated at that position whose key/value input " +
                                          "there is kept (read by its queries at later positions)", box);
    if (v.nodes.some((n) => n.extra) || v.edges.some((e) => e.extra)) {
      div("dashed orange outline, dashed edge: kept by resamples but not by the circuit shown", box);
    }
  }

  function drawCircuitToggles(v) {
    const box = $("circuit-toggles");
    box.textContent = "";
    state.circuits = v.circuits.map(() => true);
    box.hidden = !v.circuits.length;
    $("colour-pick").hidden = !v.circuits.length || !v.edges.some((e) => e.c);
    if (!v.circuits.length) return;
    box.appendChild(document.createTextNode(v.toggle_label || "circuits"));
    v.circuits.forEach((name, i) => {
      const l = document.createElement("label");
      const c = document.createElement("input");
      c.type = "checkbox";
      c.checked = true;
      c.dataset.circuit = name;
      c.addEventListener("change", () => { state.circuits[i] = c.checked; update(); });
      l.appendChild(c);
      l.appendChild(document.createTextNode(" " + name));
      box.appendChild(l);
    });
  }

  // ---- the faithfulness curve -----------------------------------------------------------------------
  function setUpCurve(v) {
    const c = v.curve, s = $("slider");
    $("curve").hidden = !c;
    state.point = -1;
    if (!c) return;
    $("curve-name").textContent = c.name;
    $("curve-n").textContent = c.n_edges;
    s.max = c.points.length - 1;
    state.point = Math.max(0, c.points.findIndex((p) => p.own));
    s.value = state.point;
    showPoint();
  }

  function fmt(x) { return typeof x === "number" ? x.toFixed(3) : "unknown"; }

  function showPoint() {
    const p = view.curve.points[state.point];
    $("curve-k").textContent = p.k;
    $("curve-pct").textContent = p.pct;
    $("curve-r").textContent = fmt(p.r);
    $("curve-f").textContent = fmt(p.f);
    const own = view.curve.points.find((q) => q.own);
    $("curve-own").textContent = p.own ? "(this circuit)" : own && p.k > own.k
      ? `(the circuit's ${own.k} and ${p.k - own.k} more that the search removed: those are not drawn)`
      : "(the top edges of the ranking)";
  }

  // ---- what is shown --------------------------------------------------------------------------------
  function held(sets) {
    return !sets || !state.circuits.length || sets.some((i) => state.circuits[i]);
  }

  function update() {
    const v = view, c = v.curve, k = c && state.point >= 0 ? c.points[state.point].k : null;
    visibleEdge = v.edges.map((e, i) => state.inputs[e.i] && held(e.sets) && (k === null || c.edge_at[i] < k));
    const touched = new Array(v.nodes.length).fill(false);
    v.edges.forEach((e, i) => { if (visibleEdge[i]) { touched[e.s] = true; touched[e.t] = true; } });
    visibleNode = v.nodes.map((n, i) => {
      if (n.ghost) return touched[i];
      if (!held(n.sets)) return false;
      if (k === null || n.k === "embed" || n.k === "logits") return true;
      return c.node_at[i] < k;
    });
    v.edges.forEach((e, i) => {
      edgeEls[i].classList.toggle("off", !visibleEdge[i]);
      edgeEls[i].setAttribute("stroke", edgeColour(e));
    });
    v.nodes.forEach((n, i) => nodeEls[i].classList.toggle("off", !visibleNode[i]));
    const nn = visibleNode.filter((x, i) => x && !v.nodes[i].ghost).length, ne = visibleEdge.filter(Boolean).length;
    const all = v.nodes.filter((n) => !n.ghost).length;
    $("shown").textContent = `showing ${nn} of ${all} nodes and ${ne} of ${v.edges.length} edges` +
      (v.edges.length || !v.nodes.length ? "" : " (node-level: every edge between the nodes belongs to it; not drawn)");
    if (state.picked) highlight(state.picked);
    search();
  }

  // ---- paths through a unit -------------------------------------------------------------------------
  let outOf = [], into = [];
  function buildAdjacency() {
    outOf = view.nodes.map(() => []);
    into = view.nodes.map(() => []);
    view.edges.forEach((e, i) => { outOf[e.s].push(i); into[e.t].push(i); });
  }

  function walk(starts, forward) {
    const seen = new Set(starts), todo = [...starts];
    while (todo.length) {
      const n = todo.pop();
      for (const i of (forward ? outOf[n] : into[n])) {
        if (!visibleEdge[i]) continue;
        const m = forward ? view.edges[i].t : view.edges[i].s;
        if (!seen.has(m)) { seen.add(m); todo.push(m); }
      }
    }
    return seen;
  }

  function ends(kind) {
    return view.nodes.map((n, i) => i).filter((i) => view.nodes[i].k === kind && visibleNode[i]);
  }

  function highlight(picked) {
    const g = $("graph");
    for (const el of g.querySelectorAll(".on, .picked")) el.classList.remove("on", "picked");
    const fromEmbed = walk(ends("embed"), true), toLogits = walk(ends("logits"), false);
    let up, down;
    if (picked.kind === "node") {
      up = walk([picked.i], false); down = walk([picked.i], true);
      nodeEls[picked.i].classList.add("picked");
    } else {
      const e = view.edges[picked.i];
      up = walk([e.s], false); down = walk([e.t], true);
      edgeEls[picked.i].classList.add("picked", "on");
    }
    const before = new Set([...up].filter((n) => fromEmbed.has(n)));
    const after = new Set([...down].filter((n) => toLogits.has(n)));
    if (picked.kind === "node") { before.add(picked.i); after.add(picked.i); }
    let nNodes = 0, nEdges = picked.kind === "edge" ? 1 : 0;
    for (const n of new Set([...before, ...after])) { nodeEls[n].classList.add("on"); nNodes++; }
    view.edges.forEach((e, i) => {
      if (!visibleEdge[i]) return;
      if ((before.has(e.s) && before.has(e.t)) || (after.has(e.s) && after.has(e.t))) {
        edgeEls[i].classList.add("on"); nEdges++;
      }
    });
    g.classList.add("focus");
    const item = picked.kind === "node" ? view.nodes[picked.i] : view.edges[picked.i];
    const box = $("selection");
    box.textContent = "";
    for (const line of item.info) div(line, box);
    const onPath = before.has(picked.kind === "node" ? picked.i : view.edges[picked.i].s) &&
      fromEmbed.has(picked.kind === "node" ? picked.i : view.edges[picked.i].s);
    div(`${nNodes} nodes and ${nEdges} edges on the paths through it from the embedding to the logits` +
        (onPath || !view.edges.length ? "" : " (no path from the embedding reaches it)"), box, "paths");
  }

  function pick(target) {
    if (!target) {
      state.picked = null;
      $("graph").classList.remove("focus");
      for (const el of $("graph").querySelectorAll(".on, .picked")) el.classList.remove("on", "picked");
      return;
    }
    state.picked = { kind: target.classList.contains("edge") ? "edge" : "node", i: +target.dataset.i };
    highlight(state.picked);
  }

  // ---- search ---------------------------------------------------------------------------------------
  function search() {
    const q = state.search, g = $("graph");
    for (const el of g.querySelectorAll(".found")) el.classList.remove("found");
    if (!q) { g.classList.remove("searching"); $("found").textContent = ""; return; }
    let hits = view.nodes.map((n, i) => i).filter((i) => view.nodes[i].u === q || view.nodes[i].label === q);
    if (!hits.length) hits = view.nodes.map((n, i) => i).filter((i) => view.nodes[i].u.startsWith(q));
    hits = hits.filter((i) => visibleNode[i]);
    for (const i of hits) nodeEls[i].classList.add("found");
    g.classList.toggle("searching", hits.length > 0);
    $("found").textContent = hits.length ? `${hits.length} found` : `no unit ${q} shown`;
    if (hits.length) nodeEls[hits[0]].scrollIntoView({ block: "nearest", inline: "nearest" });
  }

  // ---- hover ----------------------------------------------------------------------------------------
  function unitOf(target) {
    return target && target.closest ? target.closest("[data-unit], [data-ghost]") : null;
  }

  function showTip(el, ev) {
    const item = el.classList.contains("edge") ? view.edges[+el.dataset.i] : view.nodes[+el.dataset.i];
    const tip = $("tip");
    tip.textContent = "";
    for (const line of item.info) div(line, tip);
    tip.hidden = false;
    moveTip(ev);
  }

  function moveTip(ev) {
    const tip = $("tip");
    const x = Math.min(ev.clientX + 14, window.innerWidth - tip.offsetWidth - 4);
    const y = ev.clientY + 14 + tip.offsetHeight > window.innerHeight ? ev.clientY - tip.offsetHeight - 8 : ev.clientY + 14;
    tip.style.left = Math.max(0, x) + "px";
    tip.style.top = Math.max(0, y) + "px";
  }

  function wire() {
    const g = $("graph");
    g.addEventListener("mouseover", (ev) => { const el = unitOf(ev.target); if (el) showTip(el, ev); });
    g.addEventListener("mousemove", (ev) => { if (!$("tip").hidden) moveTip(ev); });
    g.addEventListener("mouseout", (ev) => {
      const el = unitOf(ev.target);
      if (el && !el.contains(ev.relatedTarget)) $("tip").hidden = true;
    });
    g.addEventListener("click", (ev) => { const el = unitOf(ev.target); pick(el && el.dataset.unit ? el : null); });
    for (const c of document.querySelectorAll("#input-toggles input")) {
      c.addEventListener("change", () => { state.inputs[c.dataset.input] = c.checked; update(); });
    }
    $("slider").addEventListener("input", () => { state.point = +$("slider").value; showPoint(); update(); });
    $("search").addEventListener("input", () => { state.search = $("search").value.trim(); search(); });
    $("colour").addEventListener("change", () => { state.colour = $("colour").value; update(); });
    $("zoom").addEventListener("change", fit);
    window.addEventListener("resize", fit);
    const pickView = $("view");
    if (DATA.views.length > 1) {
      $("view-pick").hidden = false;
      DATA.views.forEach((v, i) => {
        const o = document.createElement("option");
        o.value = i;
        o.textContent = v.name;
        pickView.appendChild(o);
      });
      pickView.addEventListener("change", () => drawView(DATA.views[+pickView.value]));
    }
  }

  $("title").textContent = DATA.title;
  wire();
  drawView(DATA.views[0]);
  document.body.dataset.ready = "1";
})();
