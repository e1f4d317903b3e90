"""The `kronpeft` subcommands, one `cmd_<name>(args)` each, and their helpers (loading an adapter to evaluate,
generating text). cli.py parses the command line and calls them; they never import it. Heavy modules (torch,
transformers, the training loop) are imported inside the functions, so `kronpeft --help` stays fast."""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from .errors import UsageError


def cmd_study(args, parse) -> int:
    """Runs the grid args.grid; `parse` (the CLI parser's parse_args, passed in by main) checks every run's
    flags before any starts."""
    from .study.estimate import dry_run
    from .study.execute import run_grid, stop_on_sigterm
    from .study.grid import check_runs, load_grid, select

    grid = select(load_grid(args.grid), args.tasks, args.methods)
    check_runs(grid, parse)
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


def cmd_report(args) -> int:
    from .report.page import is_report_page, render
    from .study.grid import load_grid

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


def cmd_train(args) -> int:
    from .feedback import is_main_process, learned_nothing_warning
    from .train.loop import print_summary, run

    if args.output_dir is None:
        args.output_dir = str(Path("runs") / args.task / args.method)
    metrics = run(args)
    if metrics is not None and is_main_process():
        print_summary(metrics, Path(args.output_dir))
        warning = learned_nothing_warning(metrics)
        if warning:
            print(warning, file=sys.stderr)
    return 0


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


def cmd_eval(args) -> int:
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


def cmd_merge(args) -> int:
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


def cmd_generate(args) -> int:
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


def cmd_convert(args) -> int:
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
