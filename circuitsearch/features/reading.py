"""What a kept feature is: where it fires on the task's prompts and what its decoder direction writes.

For each feature node: its top-activating (prompt, position) pairs among the task's clean prompts in the full
model, each with the token there and a few tokens before it; and the tokens its decoder direction promotes and
suppresses through the unembedding (W_dec[i] · W_U, the direct logit effect of one unit of the feature, before
the final norm). The error node has no direction: its top positions are those where it is largest (its norm).
"""
from __future__ import annotations

import torch

TOP_ACTS, TOP_TOKENS, CONTEXT = 5, 8, 4


def token_text(tokenizer, i: int) -> str:
    """One token as text (its id, #i, for a model without a tokenizer)."""
    if tokenizer is None:
        return f"#{i}"
    return tokenizer.decode([int(i)])


def read_features(ev, names: list[str], top: int = TOP_ACTS, tokens: int = TOP_TOKENS) -> dict:
    """{feature node name: its reading} for the feature nodes among `names` (others are skipped): "site", "index",
    "top" [{"prompt", "position", "token", "context", "activation"}] (the prompts where it peaks highest, at their
    peak position; prompt = the task's row), "promotes" and "suppresses" [token texts]
    (features only), "summary" (one line, for hover text) and "lines" (for the page)."""
    ix, tok = ev.index, getattr(ev.model, "tokenizer", None)
    rows = ev.batch.tokens.cpu()
    first = ev.rows_first.tolist()
    lengths = ev.task.lengths[ev.rows_first]
    W_U = ev.engine.w.W_U
    out = {}
    for j, (site, sp) in enumerate(zip(ix.sites, ev.splices)):
        wanted = {n for n in names if n in site.nodes}
        if not wanted:
            continue
        f, e = sp.parts(*ev.clean_run.hooks[j])  # the full model on the task's distinct clean prompts
        real = torch.arange(rows.shape[1])[None] < lengths[:, None]
        for k, n in enumerate(site.nodes):
            if n not in wanted:
                continue
            is_err = k == len(site.active)
            act = (e.norm(dim=-1) if is_err else f[..., k]).float().cpu().masked_fill(~real, float("-inf"))
            peak, at = act.max(1)  # each prompt's strongest position: the top prompts, not one prompt's positions
            where = []
            for r in peak.argsort(descending=True)[:top].tolist():
                v, p = float(peak[r]), int(at[r])
                if v == float("-inf") or (not is_err and v <= 0):
                    continue
                ctx = "".join(token_text(tok, t) for t in rows[r, max(0, p - CONTEXT):p].tolist())
                where.append({"prompt": int(first[r]), "position": p, "token": token_text(tok, int(rows[r, p])),
                              "context": ctx, "activation": round(v, 4)})
            reading = {"site": site.hook if site.hook == site.writes else f"{site.hook} -> {site.writes}",
                       "index": None if is_err else int(site.active[k]), "top": where}
            if not is_err:
                logit = (sp.W[k].to(W_U.dtype) @ W_U).float().cpu()
                reading["promotes"] = [token_text(tok, i) for i in logit.topk(tokens).indices.tolist()]
                reading["suppresses"] = [token_text(tok, i) for i in (-logit).topk(tokens).indices.tolist()]
            reading["summary"], reading["lines"] = _describe(n, reading)
            out[n] = reading
    return out


def _describe(name: str, r: dict) -> tuple[str, list[str]]:
    """(one-line summary, page lines) of a reading."""
    fires = ", ".join(f"{w['context']}[{w['token']}] {w['activation']:g}" for w in r["top"][:3]) or "nowhere"
    what = "largest" if r["index"] is None else "fires most"
    lines = [f"{name}: {'error of' if r['index'] is None else 'feature of'} the dictionary at {r['site']}",
             f"{what} at: {fires}"]
    if "promotes" in r:
        lines.append("promotes: " + " ".join(repr(t) for t in r["promotes"][:6]))
        lines.append("suppresses: " + " ".join(repr(t) for t in r["suppresses"][:6]))
    return "; ".join(lines[1:]), lines

