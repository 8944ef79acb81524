"""The experts study (issue 11, item 4): domain experts alone, uniform mixtures and context-posterior routing.

    .venv/bin/python experiments/experts_study.py run [--questions 200] [--out results/experts_study.json]
    .venv/bin/python experiments/experts_study.py report [--json results/experts_study.json] [--md research/experts.md]
    .venv/bin/python experiments/experts_study.py run --tiny --out /tmp/tiny_study.json   # tiny random models, seconds

Every model (the base and the N domain experts) scores every text once, in process, with exact
full-vocabulary probabilities; only each target token's log-probability (and each position's top-1
id) is kept, cached per model under MESH_HOME/study/ so reruns and re-tunings cost seconds. A linear
mixture's probability of a target is then exact: p_mix(t) = sum_i w_i p_i(t).

Held-out text: MESH_HOME/corpora/<domain>/heldout.txt of each domain, cut into chunks of --chunk
scored tokens (each chunk on its own, context reset); even chunks tune, odd chunks test; the mixed set
is every domain's test chunks. Posterior routing uses mesh_llm.router.posterior (posterior(),
mixing_weights()) and the live router's ranking: at every position the experts' mean log-likelihood of
the (at most --window) chunk tokens before it, uniform at the first position; top K by posterior
(ties by name), floored weights. The prompt-only variant freezes the weights after the first
--prompt-tokens tokens. Temperature and floor are chosen on the tuning half, reported on the test half.

ARC-Easy (validation, oe_eval rc_0shot requests) is scored exactly: the sum of the answer tokens'
log-probabilities under each model or mixture; posterior weights come from the question text.

Experts fine-tuned on their last layers share the base's embeddings and first decoder layers; the
shared trunk is computed once and only each model's own layers run per model (checked against a plain
forward of every model before scoring).

`report` fills the generated blocks (<!-- gen:NAME --> ... <!-- /gen -->) of the markdown report from
the JSON, so the report's numbers always come from one run.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from mesh_llm.paths import mesh_home
from mesh_llm.router.posterior import (
    PosteriorConfig,
    PosteriorTracker,
    mixing_weights,
    posterior,
)
from meshlab.common import _jsonable, command_line, machine_info, markdown_table

DOMAINS = {"python": "py-expert", "legal": "legal-expert", "man": "man-expert", "prose": "prose-expert"}
TEMPERATURES = (0.03, 0.1, 0.3, 1.0)
FLOORS = (0.0, 0.05)
ROUTED_KS = (1, 2, 4)


# ----------------------------------------------------------------------------------------------------
# Scoring: target log-probabilities and top-1 ids of every model, one shared trunk


def shared_trunk(base, others: Sequence) -> int:
    """Leading decoder layers (with the embeddings) whose weights every model shares with base; 0 if none."""
    import torch

    def inner(m):
        return m.model.model

    b = inner(base)
    for o in others:
        if (o.model.config.num_hidden_layers != base.model.config.num_hidden_layers
                or not torch.equal(inner(o).embed_tokens.weight, b.embed_tokens.weight)):
            return 0
    shared = 0
    for i, layer in enumerate(b.layers):
        ref = layer.state_dict()
        if all(all(torch.equal(ref[k], v) for k, v in inner(o).layers[i].state_dict().items()) for o in others):
            shared = i + 1
        else:
            break
    return shared


def model_identity(loaded) -> str:
    """A short hash of a model's weights (embeddings, final norm, last layer) so a retrained expert misses the cache."""
    import torch

    inner = loaded.model.model
    h = hashlib.sha256(loaded.fingerprint.encode())
    for t in (inner.embed_tokens.weight[:512], inner.norm.weight, *inner.layers[-1].state_dict().values(),
              *inner.layers[0].state_dict().values()):
        h.update(t.detach().to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class Pack:
    tokens: list[int]  # input ids, one forward row
    positions: list[int]  # position id of each input token
    segments: list[int]  # -1: shared prefix (seen by all); j: continuation j (sees the prefix and itself only)
    rows: list[int]  # input index whose next-token distribution predicts each target
    targets: list[int]  # the scored token ids


def chunk_pack(ids: Sequence[int]) -> Pack:
    """A text chunk scored teacher-forced: ids[1:] given everything before."""
    n = len(ids) - 1
    return Pack(tokens=list(ids[:-1]), positions=list(range(n)), segments=[-1] * n, rows=list(range(n)),
                targets=list(ids[1:]))


def question_pack(ctx: Sequence[int], conts: Sequence[Sequence[int]]) -> Pack:
    """One forward for a question and all its answers: targets are ctx[1:], then each answer's tokens in turn.

    The answers follow the question side by side (each attends to the question and itself, with the
    positions it would have alone), so the question is computed once instead of once per answer.
    """
    n = len(ctx)
    tokens, positions, segments = list(ctx), list(range(n)), [-1] * n
    rows, targets = list(range(n - 1)), list(ctx[1:])
    for j, cont in enumerate(conts):
        start = len(tokens)
        tokens += list(cont[:-1])
        positions += list(range(n, n + len(cont) - 1))
        segments += [j] * (len(cont) - 1)
        rows += [n - 1] + list(range(start, start + len(cont) - 1))
        targets += list(cont)
    return Pack(tokens=tokens, positions=positions, segments=segments, rows=rows, targets=targets)


class Scorer:
    """Exact target log-probabilities of token packs under several models sharing a tokenizer."""

    def __init__(self, loaded: Sequence, trunk_from=None) -> None:
        self.loaded = list(loaded)
        self.trunk_from = trunk_from or self.loaded[0]  # whose modules compute the shared layers
        self.shared = shared_trunk(self.trunk_from, self.loaded)

    def _mask(self, emb, position_ids, segments):
        """The attention mask: plain causal (transformers builds it), or causal within segments for packs."""
        import torch
        from transformers.masking_utils import create_causal_mask

        config = self.trunk_from.model.config
        if bool((segments == -1).all()):
            return create_causal_mask(config=config, inputs_embeds=emb, attention_mask=None, cache=None,
                                      position_ids=position_ids)
        t = segments.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        same = (segments[:, None, :] == -1) | (segments[:, None, :] == segments[:, :, None])
        allowed = (causal & same)[:, None]  # batch × 1 × query × key
        if config._attn_implementation == "sdpa":
            return allowed
        if config._attn_implementation == "eager":
            return torch.zeros(allowed.shape, dtype=emb.dtype).masked_fill(~allowed, torch.finfo(emb.dtype).min)
        raise RuntimeError(f"packed scoring supports sdpa and eager attention, not {config._attn_implementation}")

    @staticmethod
    def _layers(layers, h, mask, pos_emb, position_ids):
        for layer in layers:
            h = layer(h, attention_mask=mask, position_embeddings=pos_emb, position_ids=position_ids)
        return h

    def score(self, packs: Sequence[Pack], batch_size: int = 4,
              progress: str | None = None) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
        """Per model: (log p of each pack's targets, top-1 id at those rows) for every pack."""
        import torch

        out = [([None] * len(packs), [None] * len(packs)) for _ in self.loaded]
        order = sorted(range(len(packs)), key=lambda i: len(packs[i].tokens))
        began, done = time.perf_counter(), 0
        device = self.trunk_from.device
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(packs[i].tokens) for i in batch)
            x = torch.zeros((len(batch), width), dtype=torch.long)  # right padding, never attended by real tokens
            pos = torch.arange(width).repeat(len(batch), 1)
            seg = torch.full((len(batch), width), -2, dtype=torch.long)
            rows, cols, targets, spans = [], [], [], []
            for r, i in enumerate(batch):
                p = packs[i]
                x[r, : len(p.tokens)] = torch.tensor(p.tokens)
                pos[r, : len(p.tokens)] = torch.tensor(p.positions)
                seg[r, : len(p.tokens)] = torch.tensor(p.segments)
                spans.append((len(targets), len(p.targets)))
                rows += [r] * len(p.targets)
                cols += p.rows
                targets += p.targets
            if bool((seg[:, :1] == -1).all()) and bool(((seg == -1) | (seg == -2)).all()):
                seg = torch.full_like(seg, -1)  # plain causal chunks: padding needs no mask of its own
            rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
            tgt = torch.tensor(targets).unsqueeze(1)
            with torch.inference_mode():
                inner = self.trunk_from.model.model
                x, pos = x.to(device), pos.to(device)
                emb = inner.embed_tokens(x)
                mask = self._mask(emb, pos, seg)
                if mask is not None:
                    mask = mask.to(device)
                pos_emb = inner.rotary_emb(emb, position_ids=pos)
                trunk = self._layers(inner.layers[: self.shared], emb, mask, pos_emb, pos)
                for m, loaded in enumerate(self.loaded):
                    own = loaded.model.model
                    h = own.norm(self._layers(own.layers[self.shared:], trunk, mask, pos_emb, pos))
                    logp = torch.log_softmax(loaded.model.lm_head(h[rows_t, cols_t]).float(), dim=-1)
                    lp = logp.gather(1, tgt.to(logp.device)).squeeze(1).double().cpu().numpy()
                    top1 = logp.argmax(dim=-1).cpu().numpy().astype(np.int32)
                    for (offset, n), i in zip(spans, batch):
                        out[m][0][i] = lp[offset:offset + n]
                        out[m][1][i] = top1[offset:offset + n]
            done += len(batch)
            if progress:
                print(f"\r{progress}: {done}/{len(packs)}, {time.perf_counter() - began:.0f} s",
                      end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        return out

    def check_against_plain_forward(self, seqs: Sequence[Sequence[int]], packs: Sequence[Pack],
                                    tol: float = 2e-3) -> float:
        """Largest |difference| between the packs' target log-probabilities here and the concatenated plain
        forwards of each model on seqs (the same targets, one sequence at a time); raises above tol."""
        import torch

        mine = self.score(packs, batch_size=len(packs))
        worst = 0.0
        with torch.inference_mode():
            for m, loaded in enumerate(self.loaded):
                ref = []
                for ids, first in seqs:
                    x = torch.tensor([list(ids[:-1])], device=loaded.device)
                    logp = torch.log_softmax(loaded.model(input_ids=x).logits[0].float(), dim=-1)
                    ref.append(logp[first:].gather(1, torch.tensor(list(ids[first + 1:])).unsqueeze(1))
                               .squeeze(1).double().cpu().numpy())
                got = np.concatenate(mine[m][0])
                worst = max(worst, float(np.max(np.abs(np.concatenate(ref) - got))))
        if worst > tol:
            raise RuntimeError(f"shared-trunk scoring differs from a plain forward by {worst:.2e} (> {tol})")
        return worst


def check_packs(scorer: Scorer, chunk: Sequence[int], question: tuple[list[int], list[list[int]]]) -> float:
    """Check a chunk and a packed question against plain per-sequence forwards of every model."""
    ctx, conts = question
    seqs = [(list(chunk), 0), (ctx + conts[0], 0)] + [(ctx + c, len(ctx) - 1) for c in conts[1:]]
    # the packed question's targets are ctx[1:], then each answer: the same as these sequences', in this order
    flat = [chunk_pack(chunk), question_pack(ctx, conts)]
    return scorer.check_against_plain_forward(seqs, flat)


def data_key(packs: Sequence[Pack]) -> str:
    """Hash of the packs to score."""
    h = hashlib.sha256()
    for p in packs:
        for field in (p.tokens, p.positions, p.segments, p.rows, p.targets):
            h.update(np.asarray(field, dtype=np.int64).tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


SCORED: set[str] = set()  # "<kind>:<model>" scored (not read from the cache) by this process


def score_cached(models: dict[str, object], packs: Sequence[Pack], kind: str, cache: Path | None,
                 batch_size: int = 4, trunk_from=None) -> dict[str, tuple[list[np.ndarray], list[np.ndarray]]]:
    """Scores of every model on packs, from MESH_HOME/study/<model>-<kind>-<hashes>.npz when cached; else computed and saved."""
    key = data_key(packs)
    cuts = np.cumsum([0] + [len(p.targets) for p in packs])
    result, missing = {}, []
    for name, loaded in models.items():
        path = cache / f"{name}-{kind}-{model_identity(loaded)}-{key}.npz" if cache else None
        if path is not None and path.exists():
            z = np.load(path)
            result[name] = ([z["lp"][a:b] for a, b in itertools.pairwise(cuts)],
                            [z["top1"][a:b] for a, b in itertools.pairwise(cuts)])
        else:
            missing.append((name, path))
    SCORED.update({f"{kind}:{n}" for n, _ in missing})
    if missing:
        scorer = Scorer([models[n] for n, _ in missing], trunk_from=trunk_from)
        scored = scorer.score(packs, batch_size=batch_size,
                              progress=f"{kind}: {len(missing)} model(s), shared trunk {scorer.shared} layers")
        for (name, path), (lp, top1) in zip(missing, scored):
            result[name] = (lp, top1)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.savez(path, lp=np.concatenate(lp), top1=np.concatenate(top1))
    return result


# ----------------------------------------------------------------------------------------------------
# The maths: mixtures and routing over cached target log-probabilities


def uniform_mix(lp: np.ndarray) -> np.ndarray:
    """Per position, log of the uniform linear mixture of the rows' target probabilities (lp: models × positions)."""
    return np.logaddexp.reduce(lp, axis=0) - math.log(lp.shape[0])


def evidence_bounds(length: int, window: int, prompt_tokens: int | None) -> list[tuple[int, int]]:
    """For each scored position j, the [start, end) of earlier scored positions whose likelihood counts.

    Position j predicts chunk token j+1; the tokens before it were predicted at positions 0..j-1.
    Sliding: the last `window` of them. Prompt-only: only those inside the first prompt_tokens
    chunk tokens (positions 0..prompt_tokens-2), i.e. weights frozen once the prompt is read.
    """
    bounds = []
    for j in range(length):
        end = j if prompt_tokens is None else min(j, prompt_tokens - 1)
        bounds.append((max(0, end - window), end))
    return bounds


def posteriors(lp: np.ndarray, names: Sequence[str], temperature: float, window: int,
               prompt_tokens: int | None = None) -> list[dict[str, float]]:
    """P(expert | tokens before j) at each position j of one chunk (lp: experts × positions); {} where nothing is scored."""
    csum = np.concatenate([np.zeros((lp.shape[0], 1)), np.cumsum(lp, axis=1)], axis=1)
    out = []
    for start, end in evidence_bounds(lp.shape[1], window, prompt_tokens):
        if end == 0:
            out.append({})
            continue
        means = (csum[:, end] - csum[:, start]) / (end - start)
        out.append(posterior({n: float(v) for n, v in zip(names, means)}, temperature))
    return out


def choose(post: dict[str, float], names: Sequence[str], k: int, floor: float) -> tuple[list[int], list[float]]:
    """The router's choice: top k by posterior (ties by name), in name order, with floored mixing weights."""
    ranked = sorted(range(len(names)), key=lambda i: (-post.get(names[i], 0.0), names[i]))[:k]
    used = sorted(ranked, key=lambda i: names[i])
    return used, mixing_weights(post, [names[i] for i in used], floor)


def routed_mix(lp: np.ndarray, posts: Sequence[dict[str, float]], names: Sequence[str], k: int,
               floor: float) -> tuple[np.ndarray, np.ndarray]:
    """Per position, the routed mixture's log-probability of the target, and the chosen experts (positions × k)."""
    mixed = np.empty(lp.shape[1])
    chosen = np.empty((lp.shape[1], k), dtype=np.int64)
    for j, post in enumerate(posts):
        used, w = choose(post, names, k, floor)
        mixed[j] = np.logaddexp.reduce(np.log(np.maximum(w, 1e-300)) + lp[used, j])
        chosen[j] = used
    return mixed, chosen


def tracker_posteriors(lp: np.ndarray, names: Sequence[str], config: PosteriorConfig,
                       prompt_tokens: int | None = None) -> list[dict[str, float]]:
    """The same posteriors through the router's PosteriorTracker, one token at a time (slow; for tests)."""
    tracker = PosteriorTracker(config)
    out = []
    for j in range(lp.shape[1]):
        out.append(tracker.posterior())
        if prompt_tokens is not None and j >= prompt_tokens - 1:
            continue
        for i, n in enumerate(names):
            tracker.record(n, j, [float(lp[i, j])])
    return out


def nll(lps: Sequence[np.ndarray]) -> float:
    """Mean negative log-likelihood over all positions of the given per-chunk arrays."""
    return float(-np.mean(np.concatenate(lps))) if len(lps) else math.nan


@dataclass(frozen=True, kw_only=True)
class HeldOut:
    names: list[str]  # expert names in the order of lp's rows
    base: str  # the base model's name
    domains: list[str]  # domain of each chunk, in chunk order
    split: list[str]  # "tune" or "test" per chunk
    lp: dict[str, list[np.ndarray]]  # model -> per chunk, target log-probabilities
    top1: dict[str, list[np.ndarray]]  # model -> per chunk, top-1 ids
    targets: list[np.ndarray]  # per chunk, the target ids

    def idx(self, split: str, domain: str | None = None) -> list[int]:
        """Chunk indices of a split (and domain)."""
        return [i for i, (d, s) in enumerate(zip(self.domains, self.split)) if s == split and domain in (None, d)]

    def experts_lp(self, c: int) -> np.ndarray:
        """experts × positions target log-probabilities of chunk c."""
        return np.stack([self.lp[n][c] for n in self.names])


def per_domain(held: HeldOut, chunk_lps: Sequence[np.ndarray], split: str = "test") -> dict[str, float]:
    """NLL per domain and on the mixed set (every domain's chunks of the split) from per-chunk arrays for all chunks."""
    out = {d: nll([chunk_lps[c] for c in held.idx(split, d)]) for d in dict.fromkeys(held.domains)}
    out["mixed"] = nll([chunk_lps[c] for c in held.idx(split)])
    return out


def routed_rows(held: HeldOut, *, window: int, prompt_tokens: int, temperatures: Sequence[float],
                floors: Sequence[float], ks: Sequence[int]) -> tuple[list[dict], list[dict], dict]:
    """Tuned posterior-routing rows (K, sliding/prompt), the whole grid, and the chosen experts per chunk of each row."""
    grid, rows, chosen_of = [], [], {}
    n_chunks = len(held.domains)
    elp = [held.experts_lp(c) for c in range(n_chunks)]
    for variant, prompt in (("posterior", None), ("posterior-prompt", prompt_tokens)):
        posts = {t: [posteriors(elp[c], held.names, t, window, prompt) for c in range(n_chunks)] for t in temperatures}
        for k in ks:
            if k > len(held.names):
                continue
            best = None
            for t, f in itertools.product(temperatures, floors if k > 1 else floors[:1]):
                mixed = [routed_mix(elp[c], posts[t][c], held.names, k, f) for c in range(n_chunks)]
                lps = [m for m, _ in mixed]
                point = {"variant": variant, "k": k, "temperature": t, "floor": f,
                         "tune": per_domain(held, lps, "tune"), "test": per_domain(held, lps, "test")}
                grid.append(point)
                if best is None or point["tune"]["mixed"] < best[0]["tune"]["mixed"]:
                    best = (point, lps, [c for _, c in mixed])
            point, lps, chosen = best
            name = f"{variant} K={k}"
            rows.append({"row": name, "kind": variant, "k": k, "temperature": point["temperature"],
                         "floor": point["floor"], "nll": point["test"], "tune_nll": point["tune"]["mixed"],
                         "chunk_lps": lps})
            chosen_of[name] = chosen
    return rows, grid, chosen_of


def heldout_rows(held: HeldOut, *, window: int, prompt_tokens: int, temperatures=TEMPERATURES, floors=FLOORS,
                 ks=ROUTED_KS) -> dict:
    """Every row of the held-out table (test half), the tuning grid and the routing statistics."""
    n_chunks = len(held.domains)
    rows = [{"row": "base", "kind": "base", "k": 1, "chunk_lps": held.lp[held.base]}]
    for n in held.names:
        rows.append({"row": n, "kind": "expert", "k": 1, "chunk_lps": held.lp[n]})
    pairs = list(itertools.combinations(range(len(held.names)), 2))
    pair_lps = {p: [uniform_mix(held.experts_lp(c)[list(p)]) for c in range(n_chunks)] for p in pairs}
    pair_nll = {p: per_domain(held, v) for p, v in pair_lps.items()}
    best_pair = min(pairs, key=lambda p: per_domain(held, pair_lps[p], "tune")["mixed"])
    mean_pair = {key: float(np.mean([pair_nll[p][key] for p in pairs])) for key in pair_nll[pairs[0]]}
    rows.append({"row": "uniform K=2 (mean of pairs)", "kind": "uniform", "k": 2, "nll": mean_pair,
                 "pairs": {"+".join(held.names[i] for i in p): pair_nll[p] for p in pairs}})
    rows.append({"row": "uniform K=2 (best pair on tuning)", "kind": "uniform", "k": 2,
                 "members": [held.names[i] for i in best_pair], "chunk_lps": pair_lps[best_pair]})
    rows.append({"row": f"uniform K={len(held.names)}", "kind": "uniform", "k": len(held.names),
                 "chunk_lps": [uniform_mix(held.experts_lp(c)) for c in range(n_chunks)]})
    routed, grid, chosen_of = routed_rows(held, window=window, prompt_tokens=prompt_tokens,
                                          temperatures=temperatures, floors=floors, ks=ks)
    rows += routed
    for r in rows:
        if "chunk_lps" in r:
            r["nll"] = per_domain(held, r.pop("chunk_lps"))
    oracle = oracle_row(held)
    rows.append(oracle)
    return {"rows": rows, "grid": grid, "disagreement": disagreement(held, chosen_of)}


def oracle_row(held: HeldOut) -> dict:
    """The best single expert per domain, chosen with hindsight on the test half."""
    nll_d, pick = {}, {}
    tokens = {}
    for d in dict.fromkeys(held.domains):
        idx = held.idx("test", d)
        scores = {n: nll([held.lp[n][c] for c in idx]) for n in held.names}
        pick[d] = min(scores, key=scores.get)
        nll_d[d] = scores[pick[d]]
        tokens[d] = sum(len(held.lp[held.base][c]) for c in idx)
    nll_d["mixed"] = sum(nll_d[d] * tokens[d] for d in tokens) / sum(tokens.values())
    return {"row": "oracle (best expert per domain)", "kind": "oracle", "k": 1, "nll": nll_d, "picks": pick}


def disagreement(held: HeldOut, chosen_of: dict) -> dict:
    """How often the top-1 tokens of the two experts posterior K=2 picks differ (test half), and who is right then."""
    chosen = chosen_of.get("posterior K=2")
    if chosen is None:
        return {}
    out = {}
    for d in [*dict.fromkeys(held.domains), None]:
        differ = total = one_right = 0
        for c in held.idx("test", d):
            a, b = chosen[c][:, 0], chosen[c][:, 1]
            tops = np.stack([held.top1[n][c] for n in held.names])
            pos = np.arange(len(a))
            ta, tb = tops[a, pos], tops[b, pos]
            diff = ta != tb
            differ += int(diff.sum())
            total += len(a)
            one_right += int(np.sum(diff & ((ta == held.targets[c]) | (tb == held.targets[c]))))
        out[d or "mixed"] = {"share": differ / max(total, 1), "positions": total,
                             "one_of_them_right_share": one_right / max(differ, 1)}
    return out


# ----------------------------------------------------------------------------------------------------
# Data


def chunk_ids(ids: Sequence[int], scored: int, max_chunks: int | None) -> list[list[int]]:
    """Consecutive chunks of scored + 1 tokens overlapping by one (each token after the first scored once)."""
    out = []
    for start in range(0, len(ids) - scored, scored):
        out.append(list(ids[start:start + scored + 1]))
        if max_chunks is not None and len(out) >= max_chunks:
            break
    return out


def load_heldout(tokenizer, corpora: Path, domains: Sequence[str], scored: int,
                 max_chunks: int | None) -> tuple[list[list[int]], list[str], list[str], dict]:
    """Chunks of every domain's held-out text, their domain and tune/test split, and facts about the sources."""
    chunks, dom, split, info = [], [], [], {}
    for d in domains:
        path = corpora / d / "heldout.txt"
        if not path.exists():
            raise SystemExit(f"no held-out text for domain {d!r} at {path}; train the experts first "
                             "(experiments/train_experts.py train)")
        ids = tokenizer(path.read_text(), add_special_tokens=False).input_ids
        cs = chunk_ids(ids, scored, max_chunks)
        if len(cs) < 2:
            raise SystemExit(f"domain {d!r}: held-out text has {len(ids)} tokens, fewer than two chunks of {scored}")
        manifest = corpora / d / "manifest.json"
        files = []
        if manifest.exists():
            m = json.loads(manifest.read_text())
            files = [f["path"] for f in m.get("heldout", {}).get("list", [])]
        info[d] = {"heldout_tokens": len(ids), "chunks": len(cs), "heldout_files": len(files),
                   "heldout_files_sample": files[:5]}
        for i, c in enumerate(cs):
            chunks.append(c)
            dom.append(d)
            split.append("tune" if i % 2 == 0 else "test")
    return chunks, dom, split, info


# ----------------------------------------------------------------------------------------------------
# ARC-Easy, exact


def arc_split(mc, scored_lp: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """(question-text log-probabilities, [answer-token log-probabilities per choice]) per question from its pack's targets."""
    ctx_lps, answers = [], []
    for (ctx, conts), lp in zip(mc, scored_lp, strict=True):
        cuts = np.cumsum([0, len(ctx) - 1, *[len(c) for c in conts]])
        ctx_lps.append(lp[: cuts[1]])
        answers.append([lp[a:b] for a, b in itertools.pairwise(cuts[1:])])
    return ctx_lps, answers


def arc_rows(questions, mc, scores: dict[str, list[np.ndarray]], base: str, names: Sequence[str],
             routed: dict[int, tuple[float, float]], window: int) -> list[dict]:
    """Accuracy (summed and per-character log-likelihood) with standard errors for models, uniform and posterior mixes."""
    from meshlab.scoring import choice_scores

    split = {n: arc_split(mc, scores[n]) for n in [base, *names]}
    n_q = len(questions)

    def acc_row(row: str, answer_lp) -> dict:
        raw = per_char = 0
        for qi, q in enumerate(questions):
            best_raw, best_char = choice_scores(answer_lp(qi), q.choices)
            raw += best_raw == q.gold
            per_char += best_char == q.gold
        a, c = raw / n_q, per_char / n_q
        return {"row": row, "questions": n_q, "acc": a, "se": math.sqrt(a * (1 - a) / n_q),
                "acc_per_char": c, "se_per_char": math.sqrt(c * (1 - c) / n_q)}

    rows = [acc_row("base", lambda qi: split[base][1][qi])]
    rows += [acc_row(n, lambda qi, n=n: split[n][1][qi]) for n in names]
    rows.append(acc_row(f"uniform K={len(names)}", lambda qi: [
        uniform_mix(np.stack([split[n][1][qi][j] for n in names])) for j in range(len(split[base][1][qi]))]))
    for k, (t, f) in sorted(routed.items()):
        picks: dict[str, int] = {}

        def answer(qi, k=k, t=t, f=f, picks=picks):
            ev = np.stack([split[n][0][qi][-window:] for n in names])
            post = posterior({n: float(np.mean(ev[i])) for i, n in enumerate(names)}, t) if ev.shape[1] else {}
            used, w = choose(post, names, k, f)
            top = names[used[int(np.argmax(w))]]
            picks[top] = picks.get(top, 0) + 1
            return [np.logaddexp.reduce(np.log(np.maximum(w, 1e-300))[:, None]
                                        + np.stack([split[names[i]][1][qi][j] for i in used]), axis=0)
                    for j in range(len(split[base][1][qi]))]

        row = acc_row(f"posterior K={k}", answer)
        row.update(temperature=t, floor=f, top_weighted_expert=dict(sorted(picks.items())))
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------------
# Bytes and router time per token


def reply_bytes(base_loaded, ids: Sequence[int], top_k: int = 64, refresh_every: int = 16) -> dict:
    """Serialised Step request/reply sizes for top-k replies with and without score_ids, from real rows of the base."""
    import torch

    from mesh_llm.pb import expert_pb2
    from mesh_llm.wire import encode_topk

    with torch.inference_mode():
        logp = torch.log_softmax(base_loaded.model(input_ids=torch.tensor([list(ids)])).logits[0].float(), dim=-1)
    vals, top = torch.topk(logp, top_k, dim=-1)
    rest = torch.log1p(-vals.double().exp().sum(-1).clamp(max=1 - 1e-12))
    sizes = {"plain": [], "score1": [], f"score{refresh_every}": []}
    req = {"plain": [], "score1": [], f"score{refresh_every}": []}
    for j in range(refresh_every, len(ids) - 1):
        dist = encode_topk(top[j].numpy(), vals[j].double().numpy(), float(rest[j]), expert_pb2.LOGPROB_F32)
        for label, n in (("plain", 0), ("score1", 1), (f"score{refresh_every}", refresh_every)):
            reply = expert_pb2.StepReply(distributions=[dist], session_length=j + 1, compute_ms=60.0,
                                         score_logprobs=[float(x) for x in logp[j - n + 1:j + 1, 0][:n]])
            sizes[label].append(reply.ByteSize())
            tokens = list(ids[j - max(n, 1) + 1:j + 1])
            request = expert_pb2.StepRequest(session_id="s-0123456789abcdef", start_position=j + 1 - len(tokens),
                                             tokens=tokens, top_k=top_k, score_ids=tokens[:n])
            req[label].append(request.ByteSize())
    med = {k: float(np.median(v)) for k, v in sizes.items()}
    med_req = {k: float(np.median(v)) for k, v in req.items()}
    return {"top_k": top_k, "refresh_every": refresh_every, "reply_bytes": med, "request_bytes": med_req}


def per_token_bytes(b: dict, n: int, k: int) -> dict:
    """Modelled bytes per generated token at K of N: random asks K experts; posterior also refreshes the others."""
    r = b["refresh_every"]
    rand = k * (b["reply_bytes"]["plain"] + b["request_bytes"]["plain"])
    post_regular = k * (b["reply_bytes"]["score1"] + b["request_bytes"]["score1"])
    refresh = (n - k) * (b["reply_bytes"][f"score{r}"] + b["request_bytes"][f"score{r}"])
    post = post_regular + refresh / r
    return {"random": rand, "posterior": post, "ratio": post / rand}


def time_routing(base_loaded, ids: Sequence[int], *, n: int = 4, k: int = 2, top_k: int = 64,
                 iterations: int = 2000, repeats: int = 3, contexts: Sequence[int] = (64, 512, 2048)) -> dict:
    """Router ms per token (select + weights + mix, and recording the chosen token) for random and posterior selection.

    Replies are the base model's real top-k rows; posterior routing is timed after its tracker was
    given `context` scored positions per expert (how many it keeps is the tracker's business).
    """
    import torch

    from mesh_llm.mixing.aggregation import mix
    from mesh_llm.mixing.selection import Candidate, GateContext, get_policy
    from mesh_llm.wire import SparseDist

    with torch.inference_mode():
        logp = torch.log_softmax(base_loaded.model(input_ids=torch.tensor([list(ids)])).logits[0].float(), dim=-1)
    vals, top = torch.topk(logp, top_k, dim=-1)
    rest = torch.log1p(-vals.double().exp().sum(-1).clamp(max=1 - 1e-12))
    replies = []
    for j in range(len(ids)):
        order = np.argsort(top[j].numpy())
        replies.append(SparseDist(ids=top[j].numpy()[order].astype(np.int64),
                                  logprobs=vals[j].double().numpy()[order], rest_logmass=float(rest[j])))
    vocab = logp.shape[1]
    names = [f"x{i}" for i in range(n)]
    cands = [Candidate(expert_id=e, rtt_ms=1.0, tokens_per_second=10.0, weight=1.0, tokenizer_fingerprint="f")
             for e in names]
    rng = np.random.default_rng(0)
    random_policy, post_policy = get_policy("random"), get_policy("posterior")

    def run_random(i: int, tracker, at: int) -> None:
        chosen = random_policy.select(cands, k, rng)
        mix([replies[(i + c) % len(replies)] for c in range(len(chosen))], vocab_size=vocab, rule="linear")

    def run_posterior(i: int, tracker: PosteriorTracker, at: int) -> None:
        post = tracker.posterior()
        chosen = post_policy.select(cands, k, rng, GateContext(position=i, posterior=post))
        ids_ = [c.expert_id for c in chosen]
        w = mixing_weights(post, ids_, tracker.config.floor)
        mixed = mix([replies[(i + c) % len(replies)] for c in range(len(chosen))], vocab_size=vocab, weights=w,
                    rule="linear")
        token = int(mixed.ids[int(np.argmax(mixed.logprobs))])
        for c, e in enumerate(ids_):  # rewrites the newest position, so the tracker stays at the measured size
            tracker.record(e, at, [replies[(i + c) % len(replies)].logprob_of(token, vocab)])

    def tracker_with(context: int) -> PosteriorTracker:
        tracker = PosteriorTracker(PosteriorConfig())
        for pos in range(context):
            for e in names:
                tracker.record(e, pos, [float(replies[pos % len(replies)].logprobs[-1]) - 0.01 * names.index(e)])
        return tracker

    rows = []
    for label, fn, ctxs in (("random", run_random, (0,)), ("posterior", run_posterior, tuple(contexts))):
        for context in ctxs:
            medians = []
            for _ in range(repeats):
                tracker = tracker_with(context) if label == "posterior" else None
                times = []
                for i in range(iterations):
                    t0 = time.perf_counter()
                    fn(i, tracker, context - 1)
                    times.append(time.perf_counter() - t0)
                medians.append(statistics.median(times) * 1000)
            rows.append({"policy": label, "context": context, "median_ms": statistics.median(medians),
                         "min_ms": min(medians), "max_ms": max(medians)})
    return {"rows": rows, "n": n, "k": k, "top_k": top_k, "iterations": iterations, "repeats": repeats,
            "load_average": [round(x, 2) for x in os.getloadavg()]}


# ----------------------------------------------------------------------------------------------------
# The run


def load_models(refs: dict[str, str]) -> dict:
    """Load each model (name -> catalog name or folder; float32, CPU); all must share one tokenizer."""
    from mesh_llm.models.loading import LoadOptions, load

    models = {name: load(LoadOptions(model=ref, device="cpu")) for name, ref in refs.items()}
    fingerprints = {m.fingerprint for m in models.values()}
    if len(fingerprints) != 1:
        raise SystemExit("the models do not share one tokenizer; they cannot be mixed")
    return models


def run_heldout(models: dict, base: str, names: Sequence[str], args, cache: Path | None, corpora: Path) -> dict:
    """Score the held-out chunks and build every held-out row."""
    tokenizer = models[base].tokenizer
    domains = list(args.domains)
    chunks, dom, split, info = load_heldout(tokenizer, corpora, domains, args.chunk, args.max_chunks)
    began = time.perf_counter()
    lp: dict[str, list[np.ndarray]] = {n: [] for n in models}
    top1: dict[str, list[np.ndarray]] = {n: [] for n in models}
    for d in domains:  # cached per domain, so experts added later only score themselves
        packs = [chunk_pack(c) for c, cd in zip(chunks, dom) if cd == d]
        scores = score_cached(models, packs, f"heldout-{d}", cache, batch_size=args.batch, trunk_from=models[base])
        for n, (lps, tops) in scores.items():
            lp[n] += lps
            top1[n] += tops
    seconds = time.perf_counter() - began
    held = HeldOut(names=list(names), base=base, domains=dom, split=split, lp=lp, top1=top1,
                   targets=[np.asarray(c[1:]) for c in chunks])
    result = heldout_rows(held, window=args.window, prompt_tokens=args.prompt_tokens)
    snippets = [tokenizer.decode(c[:16]) for c in chunks]
    result["paired"], result["chunks"] = paired_table(held, result["rows"], args, snippets)
    result.update(domains=info, chunk_tokens=args.chunk, scoring_seconds=seconds,
                  tune_chunks=len(held.idx("tune")), test_chunks=len(held.idx("test")),
                  test_tokens=sum(len(held.targets[c]) for c in held.idx("test")))
    return result


def paired_table(held: HeldOut, rows: Sequence[dict], args,
                 snippets: Sequence[str] | None = None) -> tuple[list[dict], list[dict]]:
    """Mixed-set per-chunk NLL differences of base, each expert, uniform-4 and the oracle against posterior K=2
    (mean ± s.e.), and per test chunk: posterior K=2 against the oracle and the expert it weighted most."""
    pk2 = next(r for r in rows if r["row"] == "posterior K=2")
    n_chunks = len(held.domains)
    elp = [held.experts_lp(c) for c in range(n_chunks)]
    posts = [posteriors(elp[c], held.names, pk2["temperature"], args.window) for c in range(n_chunks)]
    ref = [routed_mix(elp[c], posts[c], held.names, 2, pk2["floor"])[0] for c in range(n_chunks)]
    oracle = next(r for r in rows if r["kind"] == "oracle")["picks"]
    others = {"base": held.lp[held.base], **{n: held.lp[n] for n in held.names},
              f"uniform K={len(held.names)}": [uniform_mix(elp[c]) for c in range(n_chunks)],
              "oracle (best expert per domain)": [held.lp[oracle[held.domains[c]]][c] for c in range(n_chunks)]}
    out = []
    test = held.idx("test")
    for name, lps in others.items():
        diffs = np.array([float(np.mean(lps[c]) - np.mean(ref[c])) for c in test])  # NLL difference; < 0: posterior K=2 better
        out.append({"row": name, "mean_diff": float(diffs.mean()),
                    "se": float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else math.nan,
                    "chunks_posterior_better": int(np.sum(diffs < 0)), "chunks": len(diffs)})
    chunks = []
    for c in test:
        tops = [max(post, key=post.get) for post in posts[c] if post]
        top = max(held.names, key=tops.count)
        chunks.append({"chunk": c, "domain": held.domains[c], "nll_posterior_k2": float(-np.mean(ref[c])),
                       "nll_oracle": float(-np.mean(others["oracle (best expert per domain)"][c])),
                       "oracle_expert": oracle[held.domains[c]], "most_weighted": top,
                       "most_weighted_share": tops.count(top) / max(len(tops), 1),
                       "starts": snippets[c] if snippets else ""})
    return out, chunks


def run_arc(models: dict, base: str, names: Sequence[str], args, cache: Path | None, held_rows: Sequence[dict],
            questions, mc) -> dict:
    """Score ARC-Easy exactly for every model and build the accuracy rows (posterior settings from the held-out tuning)."""
    began = time.perf_counter()
    scores = score_cached(models, [question_pack(ctx, conts) for ctx, conts in mc], f"{args.task}{len(questions)}",
                          cache, batch_size=16, trunk_from=models[base])
    seconds = time.perf_counter() - began
    routed = {r["k"]: (r["temperature"], r["floor"]) for r in held_rows if r["kind"] == "posterior"}
    rows = arc_rows(questions, mc, {n: s[0] for n, s in scores.items()}, base, names, routed, args.window)
    return {"task": args.task, "questions": len(questions), "rows": rows, "scoring_seconds": seconds}


def tiny_setup(folder: Path, domains: Sequence[str]) -> tuple[str, list[str], Path, list]:
    """Tiny base + experts (the base with its last layer re-drawn per expert) and synthetic held-out text and questions."""
    import torch
    from transformers import AutoModelForCausalLM

    from mesh_llm.testing.tiny_model import CORPUS, build_tiny_llama
    from meshlab.data import MCQuestion

    base = build_tiny_llama(folder / "base", seed=0, layers=3)
    experts = []
    for i, d in enumerate(domains):
        model = AutoModelForCausalLM.from_pretrained(base)
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for p in model.model.layers[-1].parameters():
                p.add_(torch.randn_like(p) * 0.3)
        out = folder / f"{d}-expert"
        model.save_pretrained(out)
        for f in base.iterdir():
            if "token" in f.name or f.name.endswith(".jinja"):
                (out / f.name).write_bytes(f.read_bytes())
        experts.append(str(out))
    corpora = folder / "corpora"
    words = CORPUS.split()
    for i, d in enumerate(domains):
        (corpora / d).mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(i)
        pool = words[i * len(words) // len(domains):][: max(8, len(words) // len(domains))]
        text = " ".join(pool[j] for j in rng.integers(0, len(pool), size=900))
        (corpora / d / "heldout.txt").write_text(text)
    questions = [MCQuestion(qid=f"q{i}", context=f"Question: {' '.join(words[i:i + 8])}\nAnswer:",
                            choices=tuple(" " + " ".join(words[i + 8 + c: i + 10 + c]) for c in range(0, 8, 2)),
                            gold=i % 4) for i in range(12)]
    return str(base), experts, corpora, questions


def run(args) -> int:
    """Score everything (or read the cache), build every table and write the JSON."""
    import torch

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args) -> int:
    """The study itself (run() sets and restores torch threads)."""
    SCORED.clear()
    machine = machine_info()
    began = time.perf_counter()
    tmp = None
    cache: Path | None = None if args.no_cache else (args.cache or mesh_home() / "study")
    args.mc_questions = None
    if args.tiny:
        tmp = tempfile.TemporaryDirectory()
        base, experts, corpora, args.mc_questions = tiny_setup(Path(tmp.name), args.domains)
        cache = Path(tmp.name) / "study"
        args.chunk, args.max_chunks, args.prompt_tokens, args.window = 48, 6, 8, 16
    else:
        base, corpora = args.base, args.corpora or mesh_home() / "corpora"
        experts = list(args.experts) if args.experts is not None else [DOMAINS.get(d, d) for d in args.domains]
    names = [Path(e).name for e in experts]
    models = load_models({"base" if args.tiny else base: base, **dict(zip(names, experts))})
    if args.tiny:
        base = "base"
    questions = args.mc_questions
    if questions is None and args.task != "none":
        from meshlab.data import load_mc_task

        questions = load_mc_task(args.task, args.questions)
    from quality import mc_tokens

    mc = mc_tokens(models[base].tokenizer, questions or [])
    check_ids = models[base].tokenizer((corpora / args.domains[0] / "heldout.txt").read_text()[:2000],
                                       add_special_tokens=False).input_ids[:65]
    scorer = Scorer(list(models.values()))
    trunk_check = (check_packs(scorer, check_ids, mc[0]) if mc else
                   scorer.check_against_plain_forward([(check_ids, 0)], [chunk_pack(check_ids)]))
    held = run_heldout(models, base, names, args, cache, corpora)
    arc = run_arc(models, base, names, args, cache, held["rows"], questions, mc) if mc else None
    sample = list(check_ids)[:64] if args.tiny else models[base].tokenizer(
        (corpora / args.domains[0] / "heldout.txt").read_text(), add_special_tokens=False).input_ids[:257]
    b = reply_bytes(models[base], sample, top_k=min(64, len(models[base].tokenizer) - 1))
    timing = time_routing(models[base], sample, n=len(names), k=min(2, len(names)),
                          iterations=args.bench_iterations, contexts=[int(c) for c in args.bench_contexts.split(",")])
    meta = {"experiment": "experts_study", "command": command_line(__file__, args.argv), "machine": machine,
            "base": base, "experts": names, "domains": list(args.domains), "window": args.window,
            "prompt_tokens": args.prompt_tokens, "temperatures": list(TEMPERATURES), "floors": list(FLOORS),
            "shared_trunk_layers": scorer.shared, "trunk_check_max_abs": trunk_check,
            "tiny": bool(args.tiny), "seconds": time.perf_counter() - began, "scored": sorted(SCORED),
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    result = {"meta": meta, "heldout": held, "arc": arc, "bytes": {**b, "per_token": per_token_bytes(b, len(names), 2)},
              "timing": timing}
    result["goal"] = goal(held)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=_jsonable))
    print(render_tables(result))
    print(f"\nwrote {args.out} in {meta['seconds']:.0f} s")
    if tmp is not None:
        tmp.cleanup()
    return 0


def goal(held: dict) -> dict:
    """The research goal for posterior K=2 of N: beats base and every expert (mixed), within 2% of the oracle, never worse than base."""
    rows = {r["row"]: r for r in held["rows"]}
    pk2 = rows["posterior K=2"]["nll"]
    singles = [r for r in held["rows"] if r["kind"] in ("base", "expert")]
    best_single = min(singles, key=lambda r: r["nll"]["mixed"])
    oracle = next(r for r in held["rows"] if r["kind"] == "oracle")["nll"]
    base = rows["base"]["nll"]
    domains = [d for d in pk2 if d != "mixed"]
    worse = {d: pk2[d] - base[d] for d in domains if pk2[d] > base[d]}
    gap = (pk2["mixed"] - oracle["mixed"]) / oracle["mixed"]
    parts = {
        "beats_every_single": pk2["mixed"] < best_single["nll"]["mixed"],
        "best_single": best_single["row"], "margin_vs_best_single": best_single["nll"]["mixed"] - pk2["mixed"],
        "oracle_gap_relative": gap, "within_2pct_of_oracle": gap <= 0.02,
        "domains_worse_than_base": worse, "never_worse_than_base": not worse,
    }
    parts["reached"] = parts["beats_every_single"] and parts["within_2pct_of_oracle"] and parts["never_worse_than_base"]
    return parts


# ----------------------------------------------------------------------------------------------------
# Tables, charts and the report


def heldout_table(result: dict) -> str:
    """Markdown: NLL per domain and on the mixed set for every row (test half)."""
    held = result["heldout"]
    domains = result["meta"]["domains"]
    rows = []
    for r in held["rows"]:
        cell = {"row": r["row"], **{d: r["nll"][d] for d in [*domains, "mixed"]}}
        settings = ""
        if r["kind"].startswith("posterior"):
            settings = f"T={r['temperature']:g}" + (f", floor={r['floor']:g}" if r["k"] > 1 else "")
        elif r["kind"] == "oracle":
            settings = ", ".join(f"{d}: {p}" for d, p in r["picks"].items())
        elif "members" in r:
            settings = "+".join(r["members"])
        cell["settings"] = settings
        rows.append(cell)
    return markdown_table(rows, [("row", "row", ""), *[(d, d, ".4f") for d in domains], ("mixed", "**mixed**", ".4f"),
                                 ("settings", "chosen on tuning half / picks", "")])


def grid_table(result: dict) -> str:
    """Markdown: mixed-set NLL of posterior K=2 (sliding) over the temperature × floor grid, tuning and test."""
    rows = [g for g in result["heldout"]["grid"] if g["k"] == 2]
    return markdown_table([{"variant": g["variant"], "T": g["temperature"], "floor": g["floor"],
                            "tune": g["tune"]["mixed"], "test": g["test"]["mixed"]} for g in rows],
                          [("variant", "variant", ""), ("T", "T", "g"), ("floor", "floor", "g"),
                           ("tune", "tuning NLL (mixed)", ".4f"), ("test", "test NLL (mixed)", ".4f")])


def paired_md(result: dict) -> str:
    """Markdown: per-chunk paired differences against posterior K=2."""
    rows = [{**p, "row": p["row"], "better": f"{p['chunks_posterior_better']}/{p['chunks']}"}
            for p in result["heldout"]["paired"]]
    return markdown_table(rows, [("row", "compared with", ""), ("mean_diff", "posterior K=2 − row, nats/token", "+.4f"),
                                 ("se", "s.e. over chunks", ".4f"), ("better", "chunks where posterior K=2 is lower", "")])


def chunks_md(result: dict, most: int = 6) -> str:
    """Markdown: the test chunks where posterior K=2 and the oracle differ most."""
    chunks = sorted(result["heldout"]["chunks"], key=lambda c: -abs(c["nll_posterior_k2"] - c["nll_oracle"]))
    rows = [{**c, "delta": c["nll_posterior_k2"] - c["nll_oracle"],
             "weighted": f"{c['most_weighted']} ({100 * c['most_weighted_share']:.0f}% of positions)",
             "starts": "`" + " ".join(c["starts"].split()).replace("`", "'").replace("|", "/")[:48] + "`"}
            for c in chunks[:most]]
    within = sum(abs(c["nll_posterior_k2"] - c["nll_oracle"]) <= 0.03 for c in chunks)
    n_all = result["heldout"]["tune_chunks"] + result["heldout"]["test_chunks"]
    return markdown_table(rows, [
        ("domain", "domain", ""), ("chunk", f"chunk (of {n_all})", "d"), ("delta", "posterior K=2 − oracle", "+.3f"),
        ("oracle_expert", "oracle's expert", ""), ("weighted", "expert posterior K=2 weighted most", ""),
        ("starts", "chunk starts", "")]) + (f"\n\n{within} of {len(chunks)} test chunks are within ±0.03 nats/token "
                                             "of the oracle.")


def arc_table(result: dict) -> str:
    """Markdown: ARC-Easy accuracy ± standard error per row."""
    arc = result["arc"]
    if not arc:
        return "(ARC not run)"
    rows = [{"row": r["row"], "acc": f"{r['acc']:.3f} ± {r['se']:.3f}",
             "acc_char": f"{r['acc_per_char']:.3f} ± {r['se_per_char']:.3f}",
             "settings": (f"T={r['temperature']:g}, floor={r['floor']:g}; top-weighted: "
                          + ", ".join(f"{k} {v}" for k, v in r["top_weighted_expert"].items()))
             if "temperature" in r else ""} for r in arc["rows"]]
    return markdown_table(rows, [("row", "row", ""), ("acc", f"accuracy (summed), n={arc['questions']}", ""),
                                 ("acc_char", "accuracy (per character)", ""), ("settings", "posterior settings", "")])


def goal_md(result: dict) -> str:
    """Markdown: the research goal, part by part, with margins."""
    g = result["goal"]
    held = {r["row"]: r for r in result["heldout"]["rows"]}
    pk2 = held["posterior K=2"]["nll"]["mixed"]
    lines = [
        (f"- Beats the base and every single expert on the mixed set: **{'yes' if g['beats_every_single'] else 'no'}** "
        f"(posterior K=2 {pk2:.4f} against the best single model, {g['best_single']}, "
        f"{held[g['best_single']]['nll']['mixed']:.4f}: margin {g['margin_vs_best_single']:+.4f} nats/token)."),
        (f"- Within 2% NLL of the per-domain oracle: **{'yes' if g['within_2pct_of_oracle'] else 'no'}** "
        f"(gap {100 * g['oracle_gap_relative']:+.2f}%)."),
        f"- Not worse than the base on any domain: **{'yes' if g['never_worse_than_base'] else 'no'}**"
        + ("" if not g["domains_worse_than_base"] else " (worse on " + ", ".join(
            f"{d} by {v:.4f}" for d, v in g["domains_worse_than_base"].items()) + ")") + ".",
        f"- Goal reached: **{'yes' if g['reached'] else 'no'}**.",
    ]
    return "\n".join(lines)


def extras_md(result: dict) -> str:
    """Markdown: tokens needing the mixture, bytes and router time per token."""
    dis = result["heldout"]["disagreement"]
    b, t = result["bytes"], result["timing"]
    out = ["| set | positions | top-1 of the two picked experts differ | of those, one of the two is right |",
           "| --- | ---: | ---: | ---: |"]
    for d, v in dis.items():
        out.append(f"| {d} | {v['positions']} | {100 * v['share']:.1f}% | {100 * v['one_of_them_right_share']:.1f}% |")
    rb, rq = b["reply_bytes"], b["request_bytes"]
    r = b["refresh_every"]
    out += ["", f"| Step message (top-{b['top_k']}, float32) | request bytes | reply bytes |",
            "| --- | ---: | ---: |",
            f"| one token, no score_ids (random policy) | {rq['plain']:.0f} | {rb['plain']:.0f} |",
            f"| one token with its score_id (posterior, chosen experts) | {rq['score1']:.0f} | {rb['score1']:.0f} |",
            (f"| refresh: {r} missed tokens with score_ids (posterior, other experts every {r} rounds) "
            f"| {rq[f'score{r}']:.0f} | {rb[f'score{r}']:.0f} |"),
            "", (f"Modelled per generated token at K=2 of N={len(result['meta']['experts'])} (requests + replies, "
            f"protobuf payload without gRPC framing): random {b['per_token']['random']:.0f} B, posterior "
            f"{b['per_token']['posterior']:.0f} B (×{b['per_token']['ratio']:.2f})."), "",
            (f"Router time per token (select + weights + mix of K={t['k']} top-{t['top_k']} replies of N={t['n']} "
             f"experts, plus the posterior tracker's update; median of {t['iterations']} tokens, {t['repeats']} "
             f"repeats: median [min–max]; load average {t['load_average']}):"), "",
            "| policy | scored positions given to the tracker | ms per token |", "| --- | ---: | ---: |"]
    for r in t["rows"]:
        held = r["context"] if r["policy"] != "random" else "–"
        out.append(f"| {r['policy']} | {held} | {r['median_ms']:.3f} [{r['min_ms']:.3f}–{r['max_ms']:.3f}] |")
    return "\n".join(out)


def meta_md(result: dict) -> str:
    """Markdown: commit, machine, load and the command."""
    m = result["meta"]
    mach = m["machine"]
    held = result["heldout"]
    doms = ", ".join(f"{d} {v['heldout_tokens']} tokens ({v['chunks']} chunks, {v['heldout_files']} files)"
                     for d, v in held["domains"].items())
    return "\n".join([
        "```", m["command"], "```", "",
        f"Commit {mach['git_commit']}; {mach['cpu']}, {mach['cores']} cores, torch {mach['torch']}, transformers "
        f"{mach['transformers']}; load average {mach['load_average']} at the start, {m['load_average_end']} at the end; "
        f"{m['seconds']:.0f} s in all (held-out scoring {held['scoring_seconds']:.0f} s"
        + (f", ARC scoring {result['arc']['scoring_seconds']:.0f} s" if result["arc"] else "")
        + f"; {len(m.get('scored', []))} model × data scores computed, the others read from the cache).",
        "", (f"Base {m['base']}; experts {', '.join(m['experts'])}. Held-out: {doms}; chunks of "
        f"{held['chunk_tokens']} scored tokens, {held['tune_chunks']} tuning and {held['test_chunks']} test chunks "
        f"({held['test_tokens']} test tokens). Window {m['window']}, prompt-only from the first {m['prompt_tokens']} "
        f"tokens; grid T ∈ {m['temperatures']}, floor ∈ {m['floors']}. Shared trunk {m['shared_trunk_layers']} "
        f"layers (max |Δ log p| against a plain forward: {m['trunk_check_max_abs']:.1e})."),
    ])


def render_tables(result: dict) -> str:
    """Every generated block as one text (printed after a run)."""
    return "\n\n".join(f"## {name}\n\n{fn(result)}" for name, fn in BLOCKS.items())


BLOCKS = {"meta": meta_md, "heldout": heldout_table, "goal": goal_md, "paired": paired_md, "chunks": chunks_md,
          "grid": grid_table,
          "arc": arc_table, "extras": extras_md}


def charts(result: dict, folder: Path) -> list[Path]:
    """experts_nll.png (NLL per domain per row, against the base) and experts_arc.png (ARC accuracy ± s.e.)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    domains = [*result["meta"]["domains"], "mixed"]
    rows = result["heldout"]["rows"]
    base = next(r for r in rows if r["kind"] == "base")["nll"]
    keep = [r for r in rows if r["kind"] != "base" and not r["row"].startswith("uniform K=2 (best")]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=90)
    width = 0.8 / len(keep)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(keep):
        ax.bar(np.arange(len(domains)) + i * width - 0.4 + width / 2, [r["nll"][d] - base[d] for d in domains], width,
               label=r["row"], color=cmap(i % 20))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set_ylabel("NLL − base NLL, nats/token\n(test half; lower is better)")
    ax.legend(fontsize=6, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    paths = [folder / "experts_nll.png"]
    fig.savefig(paths[0])
    plt.close(fig)
    if result["arc"]:
        rows = result["arc"]["rows"]
        fig, ax = plt.subplots(figsize=(7, 3), dpi=90)
        ax.bar(range(len(rows)), [r["acc"] for r in rows], yerr=[r["se"] for r in rows], capsize=3, color="tab:blue")
        ax.set_xticks(range(len(rows)), [r["row"] for r in rows], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"ARC-Easy accuracy (n={result['arc']['questions']})")
        ax.set_ylim(0, max(r["acc"] + r["se"] for r in rows) * 1.15)
        fig.tight_layout()
        paths.append(folder / "experts_arc.png")
        fig.savefig(paths[1])
        plt.close(fig)
    return paths


def fill_report(text: str, result: dict) -> str:
    """Replace every <!-- gen:NAME --> ... <!-- /gen --> block of text with the block generated from result."""
    def sub(match: re.Match) -> str:
        name = match.group(1)
        if name not in BLOCKS:
            raise SystemExit(f"unknown generated block {name!r}; known: {', '.join(BLOCKS)}")
        return f"<!-- gen:{name} -->\n{BLOCKS[name](result)}\n<!-- /gen -->"

    return re.sub(r"<!-- gen:(\w+) -->.*?<!-- /gen -->", sub, text, flags=re.DOTALL)


def report(args) -> int:
    """Regenerate the report's tables and the charts from the JSON."""
    result = json.loads(args.json.read_text())
    for p in charts(result, args.img):
        print(f"wrote {p}")
    if args.md.exists():
        args.md.write_text(fill_report(args.md.read_text(), result))
        print(f"filled {args.md}")
    else:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text("\n\n".join(f"<!-- gen:{n} -->\n<!-- /gen -->" for n in BLOCKS) + "\n")
        args.md.write_text(fill_report(args.md.read_text(), result))
        print(f"wrote a skeleton {args.md}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="score (or read the cache), tune, evaluate and write the JSON")
    r.add_argument("--base", default="smollm2-135m")
    r.add_argument("--domains", nargs="+", default=list(DOMAINS))
    r.add_argument("--experts", nargs="+", default=None, help="expert names in --domains order (default: the catalog's)")
    r.add_argument("--corpora", type=Path, default=None, help="folder of <domain>/heldout.txt (MESH_HOME/corpora)")
    r.add_argument("--chunk", type=int, default=256, help="scored tokens per chunk")
    r.add_argument("--max-chunks", type=int, default=16, help="chunks per domain (even: half tune, half test)")
    r.add_argument("--window", type=int, default=64, help="posterior sliding window (tokens)")
    r.add_argument("--prompt-tokens", type=int, default=32, help="prompt-only variant: weights from these tokens")
    r.add_argument("--task", default="arc_easy", help="arc_easy, arc_challenge or none")
    r.add_argument("--questions", type=int, default=200)
    r.add_argument("--batch", type=int, default=4, help="chunks per forward")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--bench-iterations", type=int, default=2000, help="tokens per timed repeat of the router functions")
    r.add_argument("--bench-contexts", default="64,512,2048", help="scored positions the posterior tracker holds")
    r.add_argument("--cache", type=Path, default=None, help="score cache folder (MESH_HOME/study)")
    r.add_argument("--no-cache", action="store_true")
    r.add_argument("--tiny", action="store_true", help="tiny random models and synthetic text (a smoke run)")
    r.add_argument("--out", type=Path, default=Path("results/experts_study.json"))
    g = sub.add_parser("report", help="fill the report's generated blocks and draw the charts from the JSON")
    g.add_argument("--json", type=Path, default=Path("results/experts_study.json"))
    g.add_argument("--md", type=Path, default=Path("research/experts.md"))
    g.add_argument("--img", type=Path, default=Path("research/img"))
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the study or render its report."""
    args = build_parser().parse_args(argv)
    args.argv = argv
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    raise SystemExit(main())
