"""Train the four domain experts of issue 11 (or probe which training method gains most per minute).

    nice -n 10 .venv/bin/python experiments/train_experts.py probe [--domain legal --seconds 75]
    nohup nice -n 10 .venv/bin/python experiments/train_experts.py train --resume > /tmp/train_experts.log 2>&1 &

Corpora, manifests and held-out text go to MESH_HOME/corpora/<domain>/, checkpoints of the run to
MESH_HOME/finetune/<expert>/, experts to MESH_HOME/models/<expert>/converted (registered in catalog.toml).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, replace

from mesh_llm.models.finetune import ExpertJob, TrainConfig, finetune_expert, probe
from mesh_llm.paths import mesh_home

EXPERTS = {"py-expert": "python", "legal-expert": "legal", "man-expert": "man", "prose-expert": "prose"}
# the methods compared by the probe; all see the same tokens per step (512)
PROBE_BASE = {"steps": 1000, "warmup_steps": 2, "checkpoint_every": 10**6}
PROBE_METHODS = {
    "full-lr1e-4-s256": TrainConfig(lr=1e-4, seq_len=256, batch_size=2, train_layers=0, **PROBE_BASE),
    "last8-lr3e-4-s256": TrainConfig(lr=3e-4, seq_len=256, batch_size=2, train_layers=8, **PROBE_BASE),
    "last4-lr5e-4-s256": TrainConfig(lr=5e-4, seq_len=256, batch_size=2, train_layers=4, **PROBE_BASE),
    "last4-lr5e-4-s128": TrainConfig(lr=5e-4, seq_len=128, batch_size=4, train_layers=4, **PROBE_BASE),
}


def run_probe(domain: str, seconds: float, heldout_tokens: int) -> None:
    """Train each PROBE_METHODS entry for `seconds` on one domain and print held-out NLL gained per minute."""

    from mesh_llm.models.corpora import SplitConfig, builtin_domains, prepare_corpus
    from mesh_llm.models.loading import LoadOptions, load

    loaded = load(LoadOptions(model="smollm2-135m", device="cpu"))
    corpus = prepare_corpus(builtin_domains()[domain], SplitConfig(), loaded.tokenizer, loaded.fingerprint)
    heldout = loaded.tokenizer(corpus.heldout_path.read_text(), add_special_tokens=False)["input_ids"]
    rows = probe(loaded.model, corpus.train_ids, heldout[:heldout_tokens], PROBE_METHODS, seconds,
                 mesh_home() / "finetune" / "probe")
    out = mesh_home() / "finetune" / f"probe-{domain}.json"
    out.write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(f"{row['method']:>20}: {row['steps']:3d} steps in {row['seconds']:5.1f} s, "
              f"{row['train_tokens_per_s']:6.1f} tok/s, held-out {row['heldout_nll_before']:.3f} -> "
              f"{row['heldout_nll_after']:.3f} ({row['nll_drop_per_min']:.3f} nats/token per minute)")
    print(f"written to {out}")


def run_train(args: argparse.Namespace) -> None:
    """Fine-tune, save and register the four experts in turn (skipping finished ones on --resume)."""

    config = TrainConfig() if args.steps is None else replace(TrainConfig(), steps=args.steps)
    summary = []
    for name, domain in EXPERTS.items():
        if args.only and name not in args.only:
            continue
        result = finetune_expert(ExpertJob(name=name, corpus=domain, train=config, resume=args.resume,
                                           force=args.force))
        summary.append({k: str(v) if k == "checkpoint" else v for k, v in asdict(result).items()})
        print(json.dumps(summary[-1]), flush=True)
    (mesh_home() / "finetune" / "summary.json").write_text(json.dumps(summary, indent=1))


def main() -> None:
    """Parse the command line and run probe or train."""

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="compare training methods for a fixed time on one domain")
    p.add_argument("--domain", default="legal")
    p.add_argument("--seconds", type=float, default=75.0)
    p.add_argument("--heldout-tokens", type=int, default=1024)
    t = sub.add_parser("train", help="fine-tune and register the four experts")
    t.add_argument("--resume", action="store_true", help="continue each expert from its last checkpoint")
    t.add_argument("--force", action="store_true", help="replace catalog entries of these names not made here")
    t.add_argument("--steps", type=int, default=None, help="steps per expert (default: TrainConfig's)")
    t.add_argument("--only", nargs="*", help="train only these experts")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "probe":
        run_probe(args.domain, args.seconds, args.heldout_tokens)
    else:
        run_train(args)


if __name__ == "__main__":
    main()
