"""The `circuitsearch` command. Heavy imports (torch, TransformerLens) wait until a model is needed."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _threshold(text: str) -> float | None:
    if text.lower() in ("off", "none"):
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number (or 'off')") from None


COMPARE_ORDERS = ("forward", "reverse", "alternate", "attribution", "random:1", "random:2")


class _Store(argparse._StoreAction):
    """A stored option that also notes, in the namespace's `given`, that the user gave it."""

    def __call__(self, parser, namespace, values, option_string=None):
        _note_given(namespace, self.dest)
        super().__call__(parser, namespace, values, option_string)


class _StoreTrue(argparse._StoreTrueAction):
    def __call__(self, parser, namespace, values, option_string=None):
        _note_given(namespace, self.dest)
        super().__call__(parser, namespace, values, option_string)


def _note_given(namespace, dest: str) -> None:
    if not hasattr(namespace, "given"):
        namespace.given = set()
    namespace.given.add(dest)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose options record which of them the command line gave (args.given): a flag
    the user gave is honoured or refused, never overwritten or ignored without a word."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.register("action", None, _Store)
        self.register("action", "store", _Store)
        self.register("action", "store_true", _StoreTrue)


def given(args) -> set:
    """The options (by dest) the command line gave explicitly."""
    return set(getattr(args, "given", ()))


def _add_model_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="model name (see `circuitsearch models`), a local "
                   "Hugging Face directory or a .gguf file")
    p.add_argument("--task", default="digits", help="built-in task (see `circuitsearch tasks`), a .jsonl file "
                   "(text, or token ids) or a run's task.json")
    p.add_argument("--n-prompts", type=int, default=24, help="prompts to use (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed for generating a built-in or toy task's prompts (a "
                   "random order takes its own seed: --order random:SEED)")
    p.add_argument("--keep-all", action="store_true", help="built-in tasks: keep the prompts the model answers "
                   "wrongly too (by default only answered prompts are kept; the count is reported either way)")
    p.add_argument("--template", type=_template, default=0, help="which template of the built-in task, or all "
                   "(n prompts of each template in one task)")
    p.add_argument("--positions", default="last", help="where the metric is read: last (default), all (every "
                   "position, teacher forced), or position names of the task, e.g. S2,end")
    p.add_argument("--reduce", choices=("mean", "sum"), default=None,
                   help="how a prompt's positions combine (default: sum for logprob, else mean)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run a task that looks too large for this machine's memory anyway")
    p.add_argument("--corruption", default="random", help="how corrupted prompts are made (task-specific)")
    p.add_argument("--device", default="cpu", help="where the engine runs: cpu (default), cuda, cuda:N, mps")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16", "float16"),
                   help="the engine's dtype (default float32; others are checked against the bridge with a "
                   "looser tolerance)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: 1 for models narrower than 256, else one per core)")
    p.add_argument("--engine", choices=("auto", "fast", "hooked"), default="auto",
                   help="auto (default): the fast engine where it reproduces the model, else the hook-based path "
                   "through the bridge's hook points (slower, same scores; a note says why); fast: refuse a model "
                   "the engine does not reproduce; hooked: always the hook-based path")
    p.add_argument("--sae", action="append", default=[], metavar="DIR",
                   help="splice in a sparse autoencoder or transcoder (repeatable): a sae_lens directory (cfg.json + "
                   "sae_weights.safetensors, e.g. from train-sae) or FILE.safetensors@HOOK; its features active on "
                   "the task's prompts and its error become nodes (node-level search; docs/features.md)")
    p.add_argument("--split-embed", action="store_true",
                   help="graph with two embedding senders, tok (token) and pos (learned position), in place of "
                   "embed; models with learned positions only (GPT-2 style, not rotary)")


def _template(text: str) -> int | str:
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a template number (0, 1, ...) or all") from None


def _batch(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1 (1 scores one candidate "
                                         "at a time)")
    return k


def _add_batch(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=_batch, default=16, metavar="K",
                   help="score up to K candidates per forward pass by speculation (default 16; 1: one at a "
                        "time); the decisions and the circuit are the same for every K")


BASELINE_BATCH = 1  # random circuits per extend_many pass: stacking unrelated circuits costs more than it saves
                    # on a CPU (SmolLM2 digits: 0.22 s a circuit alone, 0.25 at 2 or 4, 0.42 at 8, 0.52 at 16)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="circuitsearch", description="Find, compare and draw the circuits "
                                 "transformer language models use for a task.")
    sub = ap.add_subparsers(dest="command", required=True)

    _add_prune(sub)
    _add_compare_orders(sub)
    _add_analysis(sub)
    _add_runs_of_runs(sub)
    _add_features(sub)
    return ap


def _add_features(sub) -> None:
    """train-sae: dictionaries of features (docs/features.md)."""
    p = sub.add_parser("train-sae", help="train a small sparse autoencoder (TopK or ReLU+L1) at one hook point on "
                       "text this machine has; writes sae_lens's format and a training report")
    p.add_argument("--model", default="smollm2-135m", help="model name (see `circuitsearch models`) or a local path")
    p.add_argument("--hook", required=True, help="hook point: resid_pre.L, resid_mid.L, attn_out.L, mlp_in.L or "
                   "mlp_out.L (docs/features.md)")
    p.add_argument("--out", required=True, help="directory for cfg.json, sae_weights.safetensors, training.json")
    p.add_argument("--kind", choices=("topk", "relu"), default="topk", help="topk (default: k features per "
                   "position) or relu (an L1 penalty, --l1)")
    p.add_argument("--features", type=int, default=None, help="dictionary size (default 4 x d_model)")
    p.add_argument("--k", type=int, default=None, help="--kind topk: active features per position (default 32)")
    p.add_argument("--l1", type=float, default=None, help="--kind relu: L1 coefficient (default 3e-3)")
    p.add_argument("--steps", type=int, default=1000, help="Adam steps (default 1000)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch", type=int, default=256, help="activations per step (default 256)")
    p.add_argument("--text", default=None, help="a text file to train on (default: the built-in tasks' prompts "
                   "at every template)")
    p.add_argument("--generate", type=int, default=0, help="also train on N tokens the model writes greedily "
                   "from a few neutral prefixes (default 0)")
    p.add_argument("--task", default="digits", help="built-in task whose logit difference is reported spliced vs "
                   "full (default digits)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, batches and prompts (default 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default as for prune)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_prune(sub) -> None:
    """`prune`: the main job."""
    p = sub.add_parser("prune", help="prune the model's graph to the circuit for a task (the main job)")
    _add_model_task(p)
    p.add_argument("--level", default="both", metavar="LEVEL",
                   help="what to prune: nodes, edges, both (nodes then edges; default), or phases out of "
                        "nodes,positions,edges in that order (positions: a node at one slot of token positions, "
                        "e.g. a9.1@end; with edges too, the edges left whole are then tried at each slot); with "
                        "--sae the default is nodes")
    p.add_argument("--ablation", choices=("mean", "resample", "zero"), default="mean")
    p.add_argument("--metric", choices=("logit_diff", "prob", "kl", "accuracy", "l2", "logprob"), default="logit_diff")
    p.add_argument("--absolute", type=_threshold, default=0.8,
                   help="keep at least this fraction of the full model's performance (default 0.8; 'off')")
    p.add_argument("--relative", type=_threshold, default=None,
                   help="one removal may cost at most this much faithfulness (default off)")
    p.add_argument("--order", default=None,
                   help="attribution (default: least |EAP-IG estimate| first; alternate for --metric accuracy, "
                   "which has no gradient), forward, reverse, alternate, random:SEED, file:PATH. A resumed run "
                   "keeps the order it started with")
    p.add_argument("--max-passes", type=int, default=10)
    _add_batch(p)
    p.add_argument("--preset", choices=("acdc",), help="acdc: resample ablation, KL metric, edges, reverse order, "
                   "relative threshold on the KL itself (--relative, default 0.01), no absolute threshold; "
                   "--ablation, --metric, --level and --order given as well are kept")
    p.add_argument("--search", choices=("iterative", "masks", "target"), default=None,
                   help="iterative (default: try each candidate in --order, remove it if the thresholds hold), "
                   "masks (learned masks: optimise a continuous mask per unit aimed at --absolute, then verify, "
                   "repair and polish it exactly; --mask-steps, --mask-lr, --mask-margin), or target (the target "
                   "search: --target T1,T2,... or --absolute T)")
    p.add_argument("--mask-steps", type=int, default=None,
                   help=f"--search masks: Adam steps per phase (default {MASK_DEFAULTS.steps})")
    p.add_argument("--mask-lr", type=float, default=None,
                   help=f"--search masks: learning rate of the mask logits (default {MASK_DEFAULTS.lr:g})")
    p.add_argument("--mask-margin", type=float, default=None,
                   help=f"--search masks: aim at faithfulness --absolute + this (default {MASK_DEFAULTS.margin:g})")
    p.add_argument("--target", help="prune to target performances instead, e.g. 0.97,0.9,0.8: for each, the "
                   "smallest circuit verified at or above it (nested; attribution ranking, bisection, refinement)")
    p.add_argument("--attribution", choices=("eap", "eap-ig"), default="eap-ig",
                   help="ranking for --target and --order attribution (default eap-ig)")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps (default 5)")
    p.add_argument("--patience", type=int, default=30,
                   help="--target: the refinement pass stops after this many candidates kept in a row "
                   "(default 30; 0 = try every candidate)")
    p.add_argument("--out", default="runs/latest", help="run directory (resumes if it holds the same run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_compare_orders(sub) -> None:
    """`compare-orders`: one prune per removal order, compared."""
    p = sub.add_parser("compare-orders", help="prune with several removal orders and compare the circuits: "
                       "how often each node is kept, Jaccard, intersection and union")
    _add_model_task(p)
    p.add_argument("--orders", default=None,
                   help=f"comma-separated orders (default {','.join(COMPARE_ORDERS)}; without attribution for "
                   "--metric accuracy, which has no gradient)")
    p.add_argument("--level", default="both", metavar="LEVEL",
                   help="what to prune: nodes, edges, both (nodes then edges; default), or phases out of "
                        "nodes,positions,edges in that order (positions: a node at one slot of token positions, "
                        "e.g. a9.1@end; with edges too, the edges left whole are then tried at each slot); with "
                        "--sae the default is nodes")
    p.add_argument("--ablation", choices=("mean", "resample", "zero"), default="mean")
    p.add_argument("--metric", choices=("logit_diff", "prob", "kl", "accuracy", "l2", "logprob"), default="logit_diff")
    p.add_argument("--absolute", type=_threshold, default=0.8, help="as for prune (default 0.8)")
    p.add_argument("--relative", type=_threshold, default=None, help="as for prune (default off)")
    p.add_argument("--max-passes", type=int, default=10)
    _add_batch(p)
    p.add_argument("--out", default="runs/compare", help="directory: one run directory per order, "
                   "comparison.json, comparison.svg, report.md (resumes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--workers", type=int, help="prune the orders in parallel on this many local worker "
                   "processes (as `sweep` does; the circuits are the same)")
    p.add_argument("--ray", metavar="auto|local|ADDRESS", help="prune the orders as Ray tasks (see `sweep --ray`)")


def _add_analysis(sub) -> None:
    """attribute, score, tasks, models, diff, evaluate: reading models, tasks and circuits."""
    p = sub.add_parser("attribute", help="attribution patching: estimated effect of every node and edge, "
                       "from a few forward and backward passes")
    _add_model_task(p)
    p.add_argument("--method", choices=("eap", "eap-ig"), default="eap-ig")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG integration steps (default 5)")
    p.add_argument("--ablation", choices=("mean", "resample", "zero"), default="mean")
    p.add_argument("--metric", choices=("logit_diff", "prob", "kl", "l2", "logprob"), default="logit_diff")
    p.add_argument("--check", action="store_true", help="also ablate every node exactly and report the rank "
                   "correlation (one forward pass per node)")
    p.add_argument("--top", type=int, default=15, help="how many nodes and edges to list")
    p.add_argument("--out", default="runs/attribution", help="directory for attribution.json")

    p = sub.add_parser("score", help="scores of the full model, the corrupted run and the empty circuit")
    _add_model_task(p)
    p.add_argument("--ablation", choices=("mean", "resample", "zero"), default="mean")
    p.add_argument("--metric", choices=("logit_diff", "prob", "kl", "accuracy", "l2", "logprob"), default="logit_diff")

    sub.add_parser("tasks", help="list the built-in tasks")
    sub.add_parser("models", help="list the models and what each needs")

    p = sub.add_parser("diff", help="what circuits of one model share: counts per subset, Jaccard, overlay diagram")
    p.add_argument("circuits", nargs="+", metavar="CIRCUIT", help="circuit.json files or run directories (2 or more)")
    p.add_argument("--names", help="comma-separated names, one per circuit (default: their tasks)")
    p.add_argument("--out", default="runs/diff", help="directory for diff.json and overlay.svg/.dot")
    p.add_argument("--format", choices=("svg", "png", "pdf"), default="svg", help="overlay diagram format")

    p = sub.add_parser("evaluate", help="score circuits on their own or other tasks' prompts (cross-task matrix)")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories of finished prunes")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--task", help="one task to score every circuit on (built-in name or .jsonl)")
    g.add_argument("--tasks", help="comma-separated tasks (default: the runs' own tasks)")
    p.add_argument("--out", default="runs/crosstask.json", help="where the matrix is written as JSON")
    p.add_argument("--workers", type=int, help="score the tasks (columns) in parallel on this many local worker "
                   "processes (as `sweep` does; same scores); their logs and finished columns go to OUT's name "
                   "with .columns/")
    p.add_argument("--ray", metavar="auto|local|ADDRESS", help="score the tasks (columns) as Ray tasks (see `sweep --ray`)")


def _add_runs_of_runs(sub) -> None:
    """sweep, baseline, stability, view, render: many runs, chance, stability and pictures."""
    p = sub.add_parser("sweep", help="run many prunes over settings (models x tasks x orders x thresholds ...) "
                       "from a TOML file, on this machine's cores or a Ray cluster; summary, plots, ROC")
    p.add_argument("spec", metavar="SWEEP.toml", help="the sweep file: [fixed] settings, [axes] (crossed), "
                   "[[cases]] (bundles, e.g. model with its task); see docs/sweeps.md")
    p.add_argument("--out", default="runs/sweep", help="sweep directory: cells/<name>/ (a run directory per "
                   "cell), sweep.json, report.md, plots/ (resumes: finished cells are skipped)")
    p.add_argument("--ray", metavar="auto|local|ADDRESS", help="run the cells on Ray: the running cluster (auto), "
                   "one started here (local), or ADDRESS; needs pip install 'circuitsearch[ray]'")
    p.add_argument("--workers", type=int, help="local worker processes (default: cores, bounded by memory; "
                   "0: every cell in this process, one after another)")
    p.add_argument("--truth", help="a known circuit (circuit.json or {\"nodes\": [...], \"edges\": [...]}): "
                   "true/false positive rates per cell, ROC curves and AUC")
    _add_batch(p)
    p.add_argument("--check", action="store_true", help="check the file and list the cells; run nothing")

    p = sub.add_parser("baseline", help="is the run's circuit better than chance? random circuits of its exact "
                       "sizes scored on its prompts: their faithfulness distribution, its percentile and z-score")
    p.add_argument("run", metavar="RUN", help="the directory of a finished prune run (circuit.json and task.json)")
    p.add_argument("--random", type=int, default=200, metavar="N", help="random circuits to draw (default 200)")
    p.add_argument("--connected", action="store_true", help="only random circuits whose every node lies on a path "
                   "from the embedding to the logits")
    p.add_argument("--seed", type=int, default=0, help="seed of the random circuits (default 0; the same seed "
                   "draws the same circuits)")
    p.add_argument("--batch", type=_batch, default=BASELINE_BATCH, metavar="K",
                   help=f"random circuits per forward pass (Evaluator.extend_many; default {BASELINE_BATCH}: each "
                   "differs everywhere, so a stacked pass sums edge changes over all of theirs and costs more than "
                   "K passes on a CPU; the scores are the same for every K)")

    p = sub.add_parser("stability", help="would other prompts give the same circuit? prunes on resampled prompt "
                       "sets (on the sweep executors, resumable): node and edge frequencies, Jaccard to the "
                       "full-data circuit, each circuit scored on held-out prompts")
    _add_model_task(p)
    p.add_argument("--bootstrap", type=int, default=10, metavar="B", help="resampled prompt sets to prune "
                   "(default 10; run again with more to add resamples)")
    p.add_argument("--resample", choices=("bootstrap", "seeds"), default="bootstrap",
                   help="bootstrap (default): draw the training prompts again with replacement; seeds: make the "
                   "task anew with seed + 1, seed + 2, ... (built-in and toy tasks)")
    p.add_argument("--holdout", type=int, default=None, metavar="H", help="prompts held out for scoring, made with "
                   "the training ones and never pruned on (default: as many as --n-prompts; a task file: its last "
                   "third)")
    p.add_argument("--level", default="both", metavar="LEVEL", help="as for prune (default both)")
    p.add_argument("--ablation", choices=("mean", "resample", "zero"), default="mean")
    p.add_argument("--metric", choices=("logit_diff", "prob", "kl", "accuracy", "l2", "logprob"), default="logit_diff")
    p.add_argument("--absolute", type=_threshold, default=0.8, help="as for prune (default 0.8)")
    p.add_argument("--relative", type=_threshold, default=None, help="as for prune (default off)")
    p.add_argument("--order", default=None, help="as for prune (default attribution; alternate for accuracy)")
    p.add_argument("--max-passes", type=int, default=10)
    p.add_argument("--attribution", choices=("eap", "eap-ig"), default="eap-ig")
    p.add_argument("--steps", type=int, default=5)
    _add_batch(p)
    p.add_argument("--out", default="runs/stability", help="directory: settings.json, tasks/, sweep/ (a run "
                   "directory per prune), stability.json, report.md, stability.html, plots/ (resumes)")
    p.add_argument("--workers", type=int, help="local worker processes (as for sweep; 0: one after another in this "
                   "process)")
    p.add_argument("--ray", metavar="auto|local|ADDRESS", help="run the prunes as Ray tasks (see `sweep --ray`)")

    p = sub.add_parser("view", help="an interactive page (one HTML file that opens offline): hover for effects and "
                       "decisions, click for paths, slide along the faithfulness curve")
    p.add_argument("source", metavar="RUN|circuit.json|diff.json|comparison.json|SWEEP_DIR|STABILITY_DIR",
                   help="a run directory (prune, targets, compare-orders, sweep, stability) or one of its JSON files; "
                   "a stability directory gives its full-data circuit shaded by resample frequency")
    p.add_argument("--frequency", metavar="STABILITY_DIR", help="shade the run's circuit by the node and edge "
                   "frequencies of a stability run (its directory or stability.json) of the same model")
    p.add_argument("--out", help="the page (.html); default: view.html in the directory viewed (beside the file)")

    p = sub.add_parser("render", help="draw a circuit (circuit.json or a run directory) as SVG, PNG or PDF")
    p.add_argument("circuit")
    p.add_argument("--out", help="output file (.svg, .png, .pdf); default beside the circuit")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"prune": cmd_prune, "score": cmd_score, "tasks": cmd_tasks, "models": cmd_models,
                "render": cmd_render, "attribute": cmd_attribute, "diff": cmd_diff,
                "evaluate": cmd_evaluate, "compare-orders": cmd_compare, "sweep": cmd_sweep,
                "baseline": cmd_baseline, "stability": cmd_stability,
                "view": cmd_view, "train-sae": cmd_train_sae}[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError) as e:
        print(f"circuitsearch: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written: name it and the reason
        where = f"{e.filename}: " if e.filename else ""
        print(f"circuitsearch: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


def cmd_train_sae(args) -> int:
    from .features.train import TrainSettings

    s = TrainSettings(hook=args.hook, kind=args.kind, features=args.features, k=args.k, l1=args.l1,
                      steps=args.steps, lr=args.lr, batch=args.batch, seed=args.seed, text=args.text,
                      generate=args.generate, task=args.task)
    s.check()  # before the model loads
    import torch

    from .catalogue import load_model
    from .engine import Engine, choose_threads
    from .features.saelens import save_dictionary
    from .features.train import summary_lines, train_sae
    from .io import atomic_write_text

    torch.manual_seed(args.seed)
    model = load_model(args.model)
    choose_threads(model, args.threads)
    result = train_sae(Engine(model), s, progress=not args.quiet, log=lambda m: print(m, file=sys.stderr))
    out = save_dictionary(result.dictionary, args.out, model_name=model.name)
    atomic_write_text(out / "training.json", json.dumps(result.report, indent=1) + "\n")
    print("\n".join(summary_lines(result.report)))
    print(f"  files in {out}/: cfg.json, sae_weights.safetensors (sae_lens's format), training.json")
    return 0


def cmd_tasks(args) -> int:
    from . import toys
    from .tasks import list_tasks

    from .tasks.builtin import templates
    from .tasks.base import TaskError

    toy_tasks = [(name, desc) for name, (_, desc) in toys.TASKS.items()]
    for name, desc in list_tasks() + toy_tasks:
        print(f"{name:14s} {desc}")
        try:
            shapes = templates(name)
        except TaskError:  # a toy task: one template
            continue
        for t in shapes:  # --template N; the prompt shown before |, the answer after it
            print(f"{'':14s}   {t.index:2d} {t.name:20s} {t.pattern!r}")
    print(f"{'FILE.jsonl':14s} your own: one JSON object a line with clean, corrupted, answer, wrong_answer")
    return 0


def cmd_models(args) -> int:
    from .catalogue import MODELS
    from .models import HUB, hub_status

    for m in MODELS:
        print(f"{m.name:18s} {m.what}\n{'':18s} needs: {m.needs}")
        if m is HUB:
            print(f"{'':18s} {hub_status()}")
    return 0


from .algorithms.mask_settings import MASK_DEFAULTS  # noqa: E402  (torch-free)

ACDC_PRESET = {"ablation": "resample", "metric": "kl", "level": "edges", "order": "reverse"}


def _config(args):
    """prune's PruneConfig: the flags given, and the preset's settings where no flag was given."""
    from .config import PruneConfig

    g = given(args)
    cfg = PruneConfig(model=args.model, task=args.task, level=args.level, ablation=args.ablation,
                      metric=args.metric, absolute=args.absolute, relative=args.relative, order=args.order,
                      max_passes=args.max_passes, n_prompts=args.n_prompts, seed=args.seed,
                      template=args.template, corruption=args.corruption, attribution=args.attribution,
                      steps=args.steps, mask_steps=args.mask_steps, mask_lr=args.mask_lr,
                      mask_margin=args.mask_margin, **_engine_args(args))
    if args.search == "masks":
        for flag in ("order", "preset"):
            if flag in g:
                raise ValueError(f"--{flag} does not combine with --search masks: the masks' own order (least needed "
                                 "first) drives the repair and the polish; leave --" + flag + " out")
        cfg.order = "masks"
    if args.preset == "acdc":
        if "absolute" in g:
            raise ValueError("--absolute does not combine with --preset acdc: the preset's threshold acts on the "
                             "KL itself, as ACDC's does (one removal may raise it by at most --relative). For an "
                             "absolute threshold on faithfulness, leave --preset out and give its settings: "
                             "--ablation resample --metric kl --level edges --order reverse --absolute A "
                             "--relative R")
        if "target" in g:
            raise ValueError("--target does not combine with --preset acdc: the target search verifies "
                             "faithfulness against each target, not ACDC's per-removal KL rule; leave one out")
        kept = sorted(k for k in ACDC_PRESET if k in g)
        for k, v in ACDC_PRESET.items():
            if k not in g:
                setattr(cfg, k, v)
        cfg.on, cfg.absolute = "metric", None
        cfg.relative = 0.01 if args.relative is None else args.relative
        print(f"note: --preset acdc: {cfg.ablation} ablation, metric {cfg.metric}, level {cfg.level}, order "
              f"{cfg.order}, relative threshold {cfg.relative:g} on the {cfg.metric} itself, no absolute threshold"
              + (f" ({', '.join('--' + k for k in kept)} as given)" if kept else ""), file=sys.stderr)
    return cfg


# flags prune takes that the target search cannot honour, and why
TARGET_REFUSES = {
    "absolute": "each target is the search's absolute threshold (--target 0.8 is --absolute 0.8)",
    "relative": "bisection and refinement remove many candidates at a time, so a cost per removal has no meaning "
                "there; for a relative threshold use iterative pruning (--absolute A --relative R)",
    "order": "it ranks the candidates by their estimated gain (recorded as order gain); --attribution and "
             "--steps choose that ranking",
    "max_passes": "it has no passes: it bisects, then refines once (--patience bounds the refinement)",
}


def _check_search(args) -> None:
    """--search target takes its targets from --target, or from --absolute (one target); --target is the target
    search, so another --search with it is refused."""
    g = given(args)
    if args.search == "target":
        if args.target is None:
            args.target = str(args.absolute)
            args.given = frozenset(g - {"absolute"})
    elif args.search is not None and args.target is not None:
        raise ValueError(f"--target is the target search; it does not combine with --search {args.search}: "
                         "leave one out")
    if args.target is not None:
        for k in ("mask_steps", "mask_lr", "mask_margin"):
            if k in g:
                raise ValueError(f"--{k.replace('_', '-')} sets learned masks (--search masks), not the target "
                                 "search; leave it out")


def _check_target_flags(args) -> None:
    """--target with a flag it cannot honour, or --patience without --target: refused before loading."""
    g = given(args)
    if args.target is None:
        if "patience" in g:
            raise ValueError("--patience applies to the target search only (--target); leave it out")
        return
    for key, why in TARGET_REFUSES.items():
        if key in g:
            flag = "--" + key.replace("_", "-")
            raise ValueError(f"{flag} does not apply to --target: {why}; leave {flag} out")


def cmd_prune(args) -> int:
    from .runs import run_prune

    _check_search(args)
    _check_target_flags(args)
    cfg = _config(args)
    if args.target is not None:
        return _prune_targets(args, cfg)
    c = run_prune(cfg, args.out, progress=not args.quiet, force=args.no_memory_check, batch=args.batch)
    s, st = c.scores, c.stats
    print(f"\ncircuit for {c.task} on {c.model}: {c.sizes()} "
          f"(order {c.method['order']})")
    print(f"  faithfulness {s['faithfulness']:.3f}  normalized {s['normalized']:.3f}  "
          f"({c.method['metric']}: circuit {s['circuit']:.3f}, full {s['full']:.3f}, empty {s['empty']:.3f})")
    back = f" (with {st['backward_passes']} backward passes)" if st.get("backward_passes") else ""
    print(f"  {st['forward_passes']} forward passes{back} = {st['forward_equivalents']} full-forward equivalents, "
          f"{st['seconds']} s")
    out = Path(args.out)
    files = [f for f in ("report.md", "circuit.json", "circuit.svg", "circuit.dot", "curves.png", "curves.json",
                         "decisions.jsonl", "task.json")
             if (out / f).exists()]
    print(f"  files in {out}/: {', '.join(files)}")
    return 0


def _prune_targets(args, cfg) -> int:
    from .algorithms.target import parse_targets
    from .runs import run_targets

    targets = parse_targets(args.target)  # reject bad targets before loading the model
    if args.patience < 0:
        raise ValueError(f"--patience {args.patience} is negative: give the number of candidates kept in a row "
                         "after which refinement stops, or 0 to try every candidate")
    rows = run_targets(cfg, targets, args.out, progress=not args.quiet, patience=args.patience or None,
                       force=args.no_memory_check, batch=args.batch)
    print(f"\n{'target':>7} {'heads':>5} {'MLPs':>4} {'edges':>6} {'faithfulness':>12} {'fwd passes':>10}")
    for r in rows:
        print(f"{r.get('target'):>7} {r.get('heads'):>5} {r.get('mlps'):>4} {r.get('edges'):>6} "
              f"{r.get('faithfulness', float('nan')):>12.4f} {str(r.get('forward_passes', 'resumed')):>10}")
    print(f"  files in {args.out}/: targets.json, report.md, target-*/ (a run directory per target)")
    return 0


def cmd_compare(args) -> int:
    from .algorithms.compare import format_comparison
    from .config import PruneConfig
    from .runs import run_compare

    cfg = PruneConfig(model=args.model, task=args.task, level=args.level, ablation=args.ablation,
                      metric=args.metric, absolute=args.absolute, relative=args.relative,
                      max_passes=args.max_passes, n_prompts=args.n_prompts, seed=args.seed,
                      template=args.template, corruption=args.corruption, **_engine_args(args))
    if args.orders is not None:
        orders = [o.strip() for o in args.orders.split(",") if o.strip()]
    else:
        from .config import default_order
        orders = [o for o in COMPARE_ORDERS if o != "attribution" or default_order(args.metric) == "attribution"]
        if len(orders) < len(COMPARE_ORDERS):
            print(f"note: orders {','.join(orders)}: attribution ranks by gradients and the {args.metric} metric "
                  "has none")
    executor = _executor(args)
    if executor is not None:
        from .sweeps.compare import compare_orders

        cmp = compare_orders(cfg, orders, args.out, executor, force=args.no_memory_check)
    else:
        cmp = run_compare(cfg, orders, args.out, progress=not args.quiet, force=args.no_memory_check,
                          batch=args.batch)
    print()
    print(format_comparison(cmp), end="")
    print(f"\nfiles in {args.out}/: comparison.json, comparison.html (interactive), comparison.svg, report.md, one run "
          "directory per order")
    return 0


def cmd_attribute(args) -> int:
    import time

    from .algorithms.attribution import attribute

    model, task, ev = _evaluator(args)
    t0 = time.perf_counter()
    a = attribute(ev, method=args.method, steps=args.steps)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    a.save(out / "attribution.json")
    print(f"{args.method} on {task.name} ({len(task)} prompts, {args.ablation} ablation, {args.metric}): "
          f"{len(a.nodes)} nodes, {len(a.edges)} edges from {ev.backward_passes} forward+backward passes "
          f"in {seconds:.1f} s; full {ev.full:.3f}")
    print(f"\n{'node':>8} {'estimated change':>16}")
    for n in a.top("nodes", args.top):
        print(f"{n:>8} {a.nodes[n]:>16.4f}")
    print(f"\n{'edge':>22} {'estimated change':>16}")
    for e in a.top("edges", args.top):
        print(f"{e:>22} {a.edges[e]:>16.4f}")
    if args.check:
        from scipy.stats import spearmanr
        exact = [ev.score(nodes=[n]) - ev.full for n in ev.senders]
        rho = float(spearmanr([a.nodes[n] for n in ev.senders], exact)[0])
        print(f"\nrank correlation with exact single-node ablation ({len(exact)} forward passes): {rho:.3f}")
    print(f"\nwrote {out / 'attribution.json'}")
    return 0


def _engine_args(args) -> dict:
    """The engine's, the graph's, the readout's and the task's settings every command with _add_model_task has,
    and which flags the command line gave (PruneConfig.given: a task setting that cannot apply is refused)."""
    return {"device": args.device, "dtype": args.dtype, "threads": args.threads, "engine": args.engine,
            "split_embed": args.split_embed, "positions": args.positions, "reduce": args.reduce,
            "sae": tuple(args.sae),
            "keep_all": args.keep_all, "given": frozenset(given(args))}


def _evaluator(args):
    """The model, task and evaluator that --model, --task, --ablation, --metric and friends name."""
    from .config import PruneConfig, build

    return build(PruneConfig(model=args.model, task=args.task, ablation=args.ablation, metric=args.metric,
                             n_prompts=args.n_prompts, seed=args.seed, template=args.template,
                             corruption=args.corruption, **_engine_args(args)),
                 log=lambda m: print(m, file=sys.stderr),
                 force=args.no_memory_check)


def cmd_score(args) -> int:
    model, task, ev = _evaluator(args)
    print(json.dumps({"model": model.name, "task": task.name, "prompts": len(task), "ablation": args.ablation,
                      "metric": args.metric, "full": ev.full, "corrupted": ev.corrupted, "empty": ev.empty,
                      "task_meta": task.meta}, indent=1))
    return 0


def _load_any(path: str):
    from .graphs.export import load_circuit

    p = Path(path)
    if p.is_dir():
        p = p / "circuit.json"
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such circuit file or run directory (expected circuit.json in it)")
    return load_circuit(p)


def cmd_diff(args) -> int:
    from .graphs.diff import diff_circuits, format_table, render_overlay
    from .graphs.render import RenderError
    from .io import atomic_write_text
    from .runs.view import write_diff_page

    if len(args.circuits) < 2:
        raise ValueError("diff needs at least two circuits (circuit.json files or run directories)")
    names = [n.strip() for n in args.names.split(",")] if args.names else None
    circuits = [_load_any(c) for c in args.circuits]
    if names is None:
        tasks = [c.task for c in circuits]
        if len(set(tasks)) < len(tasks):  # same task twice (e.g. two orders): name them by their paths
            names = [Path(c).name if Path(c).is_dir() else Path(c).parent.name for c in args.circuits]
            names = names if len(set(names)) == len(names) else None
    d = diff_circuits(circuits, names)
    print(format_table(d), end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "diff.json", json.dumps(d.to_json(), indent=1))
    files = ["diff.json"]
    write_diff_page(d, out / "overlay.html")
    files.append("overlay.html")
    try:
        render_overlay(d, out / f"overlay.{args.format}")
        files += [f"overlay.{args.format}", "overlay.dot"]
    except RenderError as e:
        print(f"note: {e}", file=sys.stderr)
        files.append("overlay.dot")
    print(f"\nfiles in {out}/: {', '.join(f for f in files if (out / f).exists())}")
    return 0


def _executor(args):
    """compare-orders' and evaluate's --workers / --ray: a sweeps executor, or None (in this process)."""
    if args.workers is None and args.ray is None:
        return None
    from .sweeps import LocalExecutor, RayExecutor

    if args.workers is not None and args.ray is not None:
        raise ValueError("--workers sizes the local executor; with --ray, Ray places the work (one CPU each)")
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers}: give at least 1 (or leave it out to run everything "
                         "one after another in this process)")
    batch = getattr(args, "batch", 16)
    return (RayExecutor(address=args.ray, batch=batch) if args.ray is not None
            else LocalExecutor(workers=args.workers, batch=batch))


def cmd_evaluate(args) -> int:
    from .evaluation import cross_task, format_matrix
    from .io import atomic_write_text

    tasks = [args.task] if args.task else ([t.strip() for t in args.tasks.split(",") if t.strip()]
                                           if args.tasks else None)
    out = Path(args.out)
    executor = _executor(args)
    columns = None
    if executor is not None:
        from .sweeps.crosstask import columns_on
        columns = columns_on(executor, out.with_suffix(".columns"))
    ct = cross_task(args.runs, tasks, columns=columns)
    print()
    print(format_matrix(ct, "faithfulness"), end="")
    print()
    print(format_matrix(ct, "normalized"), end="")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(ct.to_json(), indent=1))
    print(f"\nwrote {out}")
    return 0


def _sweep_executor(args):
    """sweep's and stability's --workers / --ray: local workers by default, 0 workers in this process, or Ray."""
    from .sweeps import InlineExecutor, LocalExecutor, RayExecutor

    if args.ray is not None:
        if args.workers is not None:
            raise ValueError("--workers sizes the local executor; with --ray, Ray places the cells (one CPU each)")
        return RayExecutor(address=args.ray, batch=args.batch)
    if args.workers is not None and args.workers < 0:
        raise ValueError(f"--workers {args.workers} is negative: give a number of processes, or 0 to run the "
                         "cells in this process")
    if args.workers == 0:
        return InlineExecutor(batch=args.batch)
    return LocalExecutor(workers=args.workers, batch=args.batch)


def cmd_stability(args) -> int:
    from .config import PruneConfig
    from .sweeps.stability import check_settings, format_stability, run_stability

    cfg = PruneConfig(model=args.model, task=args.task, level=args.level, ablation=args.ablation,
                      metric=args.metric, absolute=args.absolute, relative=args.relative, order=args.order,
                      max_passes=args.max_passes, n_prompts=args.n_prompts, seed=args.seed,
                      template=args.template, corruption=args.corruption, attribution=args.attribution,
                      steps=args.steps, **_engine_args(args))
    check_settings(args.bootstrap, args.holdout, args.resample, cfg)  # before an executor or a model starts
    summary = run_stability(cfg, args.out, args.bootstrap, _sweep_executor(args), args.holdout, args.resample,
                            log=lambda m: print(m, file=sys.stderr))
    print()
    print(format_stability(summary), end="")
    print(f"files in {args.out}/: stability.json, report.md, stability.html (the full-data circuit shaded by "
          "frequency; open it in a browser), plots/, tasks/, sweep/ (cells/full/ is the full-data run; its report.md "
          "has the section too)")
    return 0


def cmd_sweep(args) -> int:
    from .sweeps import load_spec, run_sweep

    spec = load_spec(args.spec)  # every cell checked before anything runs
    if args.check:
        for c in spec.cells:
            print(f"{c.kind:6s} {c.name}")
        print(f"{len(spec.cells)} cells; settings checked")
        return 0
    summary = run_sweep(spec, args.out, _sweep_executor(args), truth=args.truth)
    c = summary["counts"]
    print(f"\n{len(summary['cells'])} cells: {c.get('done', 0)} run, {c.get('skipped', 0)} finished before, "
          f"{c.get('failed', 0)} failed ({summary['wall_seconds']:.1f} s)")
    for r in summary["cells"]:
        if r["status"] == "failed":
            print(f"  failed: {r['name']}: {r['error']}")
    for curve in summary.get("roc", {}).get("curves", []):
        print(f"  ROC {curve['kind']} {curve['series']}: AUC {curve['auc']:.3f}")
    print(f"files in {args.out}/: sweep.json, report.md, plots/, cells/<name>/ (run directories), logs/")
    return 1 if c.get("failed") else 0


def cmd_baseline(args) -> int:
    from .runs.baseline import run_baseline, table

    summary = run_baseline(args.run, args.random, args.connected, args.seed, args.batch,
                           log=lambda m: print(m, file=sys.stderr))
    print(table(summary), end="")
    st = summary["stats"]
    print(f"{st['forward_passes']} circuits scored ({st['batched_passes']} batched passes), "
          f"{st['scoring_seconds']} s scoring")
    run = Path(summary["run"])
    files = [f for f in ("baseline.json", "baseline.png", "report.md") if (run / f).exists()]
    print(f"files in {run}/: {', '.join(files)} (section 'Against random circuits of its size')")
    return 0


def cmd_view(args) -> int:
    from .runs.view import write_view

    src = Path(args.source)
    out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / "view.html"
    print(f"wrote {write_view(src, out, args.frequency)} (open it in a browser; it needs no network)")
    return 0


def cmd_render(args) -> int:
    from .graphs.export import load_circuit
    from .graphs.render import render

    path = Path(args.circuit)
    if path.is_dir():
        path = path / "circuit.json"
    circuit = load_circuit(path)
    out = Path(args.out) if args.out else path.with_suffix(".svg")
    render(circuit, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
