"""The `lmkiln` command: each subcommand parses a config and calls one library function.

User mistakes (LmkilnError) print one line and exit with code 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from lmkiln.errors import Interrupted, LmkilnError, describe_os_error
from lmkiln.files import cleanup_on_failure

log = logging.getLogger("lmkiln")


# --------------------------------------------------------------------------------------------
# Flag values: checked when the command line is parsed, so a bad one is one line, not a traceback
# from deep inside (or, worse, silently accepted: `--top-p 2`, `eval --limit -3`).


class _UsageError(LmkilnError):
    """A flag argparse refused; printed as one line with a pointer to the command's --help."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print the whole usage block and exit
        raise _UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def _number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False):
    """An argparse type: `kind` (int or float) in [low, high] ((low, high] with low_open)."""
    if low is None:
        what = "any number"
    elif high is None:
        what = f"{'greater than' if low_open else 'at least'} {low:g}"
    else:
        what = f"in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value != value or (low is not None and (value <= low if low_open else value < low)):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


COUNT = _number(int, 1)
"""A size or count of at least 1."""
NON_NEGATIVE_INT = _number(int, 0)
"""0 or more (0 usually means 'no limit' or 'derive it')."""


def _device(text: str) -> str:
    """cpu, cuda, cuda:N or mps, available on this machine."""
    import re

    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    if text.startswith("cuda") or text == "mps":
        import torch

        if text.startswith("cuda") and not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA device is available; use --device cpu")
        if text.startswith("cuda:") and int(text[5:]) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
        if text == "mps" and not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("mps is not available; use --device cpu")
    return text


def _cutoffs(text: str) -> tuple[int, ...]:
    """--k: comma-separated positive cut-offs, e.g. 1,5,10."""
    parse = _number(int, 1)
    try:
        values = tuple(sorted({parse(k.strip()) for k in text.split(",") if k.strip()}))
    except argparse.ArgumentTypeError as err:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, e.g. 1,5,10: {err}") from None
    if not values:
        raise argparse.ArgumentTypeError("give at least one cut-off, e.g. 1,5,10")
    return values


def _no_extra(extra: list[str]) -> None:
    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")


# --------------------------------------------------------------------------------------------
# Helpers


def _config_parser(name: str, help_text: str, sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """A command that takes a config; its --help lists the keys of the task the config runs."""
    parser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        allow_abbrev=False,
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-h", "--help", action="store_true", help="show this help with the config keys of the task, and exit"
    )
    parser.add_argument("--recipe", help="built-in recipe (see `lmkiln recipes`)")
    parser.add_argument("--config", help="YAML file with config sections (applied after the recipe)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.set_defaults(parser=parser)
    return parser


class _HelpShown(Exception):
    """--help was printed; the command ends here."""


def _load(args: argparse.Namespace, overrides: list[str], default_recipe: str | None = "default"):
    """The command's config; with --help, print the command's help and its task's keys instead."""
    from lmkiln.config import help_text, load_config, parse_overrides

    recipe = args.recipe or (None if args.config else default_recipe)
    if (
        recipe == "default"
        and not args.recipe
        and parse_overrides(overrides).get("task", "pretrain") != "pretrain"
    ):
        recipe = (
            None  # the default recipe is the pretraining main job; another task starts from its own defaults
        )
    cfg = load_config(recipe=recipe, config_file=args.config, overrides=overrides)
    if args.help:
        sys.stdout.write(args.parser.format_help())
        sys.stdout.write(
            f"\nconfig keys of task '{cfg.task}' (override with --section.key VALUE or section.key=VALUE; "
            f"another task's keys: add its --recipe):" + help_text(task=cfg.task) + "\n"
        )
        raise _HelpShown
    return cfg


def _print_config(cfg) -> None:
    from lmkiln.config import to_yaml

    sys.stdout.write(to_yaml(cfg, derived=False))  # what the user can set; a run also saves what it derives


def _quote(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


# --------------------------------------------------------------------------------------------
# Commands


def cmd_recipes(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra(extra)
    from lmkiln.config import recipe_names, recipe_summary

    names = recipe_names()
    width = max(map(len, names)) + 2
    for name in names:
        print(f"{name:<{width}}{recipe_summary(name)}")
    return 0


def cmd_presets(args: argparse.Namespace, extra: list[str]) -> int:
    _no_extra(extra)
    from lmkiln.config import MODEL_PRESETS, ModelConfig
    from lmkiln.model.transformer import matmul_parameters

    print(
        f"{'preset':<14} {'layers':>6} {'width':>6} {'heads':>7} {'context':>8} {'non-embedding params':>22}"
    )
    for name, values in MODEL_PRESETS.items():
        cfg = ModelConfig(**values, vocab_size=0)
        body = matmul_parameters(cfg)
        print(
            f"{name:<14} {cfg.n_layer:>6} {cfg.d_model:>6} {cfg.n_head:>3}/{cfg.kv_heads:<3} {cfg.block_size:>8} "
            f"{body / 1e6:>21.1f}M"
        )
    return 0


def cmd_tokenizer_train(args: argparse.Namespace, extra: list[str]) -> int:
    from lmkiln.data.prepare import build_tokenizer

    cfg = _load(args, extra)
    if args.print_config:
        _print_config(cfg)
        return 0
    report = build_tokenizer(cfg)
    tokenizer = report.tokenizer
    from lmkiln.files import make_output_dir

    out = tokenizer.save(make_output_dir(args.out))
    how = "from cache" if report.cached else f"trained in {report.seconds:.2f} s"
    print(f"tokenizer: {cfg.tokenizer.kind}, {tokenizer.vocab_size} tokens ({how}) → {out}/tokenizer.json")
    print(
        f"compression: {report.bytes_per_token:.2f} bytes/token on held-out text; "
        f"fast encoder: {tokenizer.fast_path}"
    )
    return 0


def cmd_data_prepare(args: argparse.Namespace, extra: list[str]) -> int:
    from lmkiln.data.prepare import prepare_data

    cfg = _load(args, extra)
    if args.print_config:
        _print_config(cfg)
        return 0
    tok, shards = prepare_data(cfg)
    _print_data_summary(tok, shards)
    print(f"shards: {shards.shards.directory}")
    return 0


def cmd_data_audit(args: argparse.Namespace, extra: list[str]) -> int:
    import json

    overrides = [*extra, f"data.corpus={args.corpus}"] if args.corpus else extra
    cfg = _load(args, overrides)
    if args.print_config:
        _print_config(cfg)
        return 0
    if args.eval:
        return _audit_contamination(args, cfg)
    if not args.corpus:
        raise LmkilnError(
            "give the corpus to audit: lmkiln data audit CORPUS (or --train CORPUS --eval FILE ...)"
        )
    from lmkiln.data.audit import audit_corpus, format_audit
    from lmkiln.data.scrub import check_types

    tokenizer = _audit_tokenizer(args.tokenizer)
    types = check_types(args.types.split(","), "--types") if args.types else None
    audit = audit_corpus(cfg.data, tokenizer, types, dedup=not args.no_dedup)
    if args.json:
        print(json.dumps(audit.as_dict(), indent=1, ensure_ascii=False))
    else:
        print(format_audit(audit))
    if args.out:
        from lmkiln.files import write_json_atomic

        write_json_atomic(args.out, audit.as_dict())
    return 0


def _audit_tokenizer(path: str | None):
    if not path:
        return None
    from pathlib import Path

    from lmkiln.data.tokenizer import Tokenizer

    directory = Path(path)
    if (directory / "tokenizer" / "tokenizer.json").is_file():  # a run directory
        directory = directory / "tokenizer"
    return Tokenizer.load(directory)


def _audit_contamination(args: argparse.Namespace, cfg) -> int:
    import json
    from pathlib import Path

    from lmkiln.data.contamination import check_contamination, write_decontaminated

    train = args.train or args.corpus
    if not train:
        raise LmkilnError("--eval needs the training corpus: --train CORPUS")
    reports = check_contamination(train, args.eval, args.ngram, cfg.data.field, cfg.data.text_unit)
    if args.json:
        print(json.dumps([r.as_dict() for r in reports], indent=1, ensure_ascii=False))
    for report in reports:
        if not args.json:
            print(
                f"{report.path}: {len(report.contaminated):,} of {report.checked:,} examples contaminated "
                f"({report.share():.1%}; {args.ngram}-gram overlap with {train}"
                + (
                    f", {len(report.examples) - report.checked} too short to check)"
                    if report.checked < len(report.examples)
                    else ")"
                )
            )
            for example in report.worst():
                print(f"  {example.location}  {example.overlap:.0%} of its n-grams  {example.match}")
        if args.decontaminate:
            written = write_decontaminated(report, Path(args.decontaminate))
            kept = len(report.examples) - len(report.contaminated)
            print(
                f"  decontaminated copy: {written} ({kept:,} examples)",
                file=sys.stderr if args.json else sys.stdout,
            )
    return 0


def _print_data_summary(tok, shards) -> None:
    tokenizer = tok.tokenizer
    how = "cached" if tok.cached else f"trained in {tok.seconds:.2f} s"
    print(f"tokenizer: {tokenizer.vocab_size} tokens ({how}), {tok.bytes_per_token:.2f} bytes/token held out")
    m = shards.shards.manifest["splits"]
    speed = "cached" if shards.cached else f"{shards.seconds:.2f} s, {shards.mb_per_s:.1f} MB/s"
    print(
        f"shards: {m['train']['tokens']:,} train / {m['val']['tokens']:,} validation tokens "
        f"({shards.shards.dtype.name}, {speed})"
    )
    from lmkiln.data.cleaning import describe_cleaning

    if describe_cleaning(shards.shards.manifest):
        print(f"data quality: {describe_cleaning(shards.shards.manifest)}")


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _exec_torchrun(args.nproc)
    cfg = _load(args, extra)
    result = _run_task(cfg, args)
    if result is not None and _is_main():
        length = (
            f"--train.max_epochs {cfg.train.max_epochs * 2}"
            if cfg.train.max_epochs
            else f"--train.max_steps {cfg.train.max_steps * 2}"
        )
        print(
            f"  lmkiln train {_recipe_args(args)}--train.run_dir {result.run_dir} --resume auto "
            f"{length}   # continue training"
        )
    return 0


def _run_task(cfg, args: argparse.Namespace):
    """Print the config (--print-config), or run the config's task and print its summary (returns its result)."""
    if args.print_config:
        _print_config(cfg)
        return None
    from lmkiln.tasks import run_task

    resume = _resume(args)
    result = run_task(cfg, resume=resume, force=args.force, overwrite=args.overwrite and resume is None)
    if _is_main():
        print(result.summary())
        if (Path(result.run_dir) / "metrics.jsonl").is_file():
            _write_run_report(result.run_dir)
    return result


def _resume(args: argparse.Namespace) -> str | None:
    """--resume, or 'auto' when torchrun restarted the workers after a failure."""
    if args.resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        log.info(
            "restart %s of this torchrun job: resuming from the newest complete checkpoint",
            os.environ["TORCHELASTIC_RESTART_COUNT"],
        )
        return "auto"
    return args.resume


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _exec_torchrun(nproc: int) -> int:
    argv = list(sys.argv[1:])
    at = argv.index("--nproc")
    del argv[at : at + 2]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "lmkiln",
        *argv,
    ]
    print(f"exec: {_quote(command)}", file=sys.stderr)
    os.execv(sys.executable, command)
    return 0  # not reached


def _recipe_args(args) -> str:
    parts = []
    if args.recipe:
        parts += ["--recipe", args.recipe]
    if args.config:
        parts += ["--config", args.config]
    return _quote(parts) + " " if parts else ""


def cmd_generate(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")
    from lmkiln.infer.generate import generate_text
    from lmkiln.runs.load import load_run

    if args.beams < 1:
        raise LmkilnError(f"--beams must be at least 1, got {args.beams}")
    loaded = load_run(args.run_dir, device=args.device)
    if args.beams > 1:
        return _generate_beams(loaded, args)
    sampling = _sampling(args)
    prompts = args.prompt or [""]
    for index, prompt in enumerate(prompts):
        if index:
            sys.stdout.write("\n---\n")
        sys.stdout.write(prompt)
        sys.stdout.flush()

        def stream(row: int, delta: str) -> None:
            sys.stdout.write(delta)
            sys.stdout.flush()

        generate_text(loaded.model, loaded.tokenizer, [prompt], sampling, on_text=stream)
        sys.stdout.write("\n")
    return 0


def _generate_beams(loaded, args: argparse.Namespace) -> int:
    """Beam search: the best continuation of each prompt, printed whole (nothing to stream)."""
    from lmkiln.model.beam import beam_search_ids

    tokenizer = loaded.tokenizer
    for index, prompt in enumerate(args.prompt or [""]):
        ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
        found = beam_search_ids(
            loaded.model, ids, args.beams, args.max_new_tokens, tokenizer.eos_id, args.length_penalty
        )
        sys.stdout.write(("\n---\n" if index else "") + prompt + tokenizer.decode(found.tokens) + "\n")
    return 0


def load_chat_model(path: str, device: str, max_context: int = 4096):
    """An lmkiln run (LoRA merged) or a local Hugging Face model directory, ready to converse.

    An imported model's context is capped at `max_context`: the server's batch cache holds that
    many positions per row up front, and a Llama 3 config allows 131,072.
    """
    from lmkiln.infer.chat import ChatModel
    from lmkiln.interop.hf_import import is_lmkiln_run, load_hf_model
    from lmkiln.runs.load import load_run, local_directory

    directory = local_directory(path, "run")
    if is_lmkiln_run(directory):
        loaded = load_run(directory, device=device)
        chat = loaded.cfg.task == "finetune" and loaded.cfg.finetune.format == "chat"
        name = loaded.checkpoint.parent.parent.resolve().name
        return ChatModel(
            loaded.model, loaded.tokenizer, name, chat, f"{loaded.checkpoint} (step {loaded.step})"
        )
    if not (directory / "config.json").is_file():
        raise LmkilnError(
            f"{directory} is neither an lmkiln run (no checkpoints/) nor a Hugging Face model "
            f"directory (no config.json)"
        )
    imported = load_hf_model(directory, device=device, max_context=max_context or None)
    chat = imported.tokenizer.chat_template is not None
    return ChatModel(
        imported.model,
        imported.tokenizer,
        directory.resolve().name,
        chat,
        f"{directory} ({imported.architecture})",
    )


def _sampling(args: argparse.Namespace):
    from lmkiln.model.generate import Sampling

    return Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop or [],
    )


def cmd_chat(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")
    from lmkiln.infer.batching import ContinuousBatcher
    from lmkiln.infer.chat import HELP, ChatFormat, ChatSession, chat_loop

    chat_model = load_chat_model(args.run_dir, args.device, args.max_context)
    chat_format = ChatFormat.for_model(chat_model, args.mode)
    session = ChatSession(
        ContinuousBatcher(chat_model.model, chat_model.tokenizer, max_rows=1),
        chat_format,
        _sampling(args),
        system=args.system or "",
    )

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    interactive = sys.stdin.isatty()

    def read_line() -> str | None:
        if interactive:
            try:
                return input("you> ")
            except EOFError:
                return None
        return sys.stdin.readline() or None

    note(f"chat with {chat_model.name}: {chat_model.source}")
    note(f"{chat_format.describe()}; context {chat_model.model.cfg.block_size} tokens")
    note(HELP)
    chat_loop(session, read_line, write, note)
    return 0


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")
    from lmkiln.serve import server

    api_key = args.api_key or os.environ.get("LMKILN_API_KEY") or None
    server.check_bind(args.host, api_key)
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LmkilnError("lmkiln serve needs FastAPI and uvicorn: pip install 'lmkiln[serve]'") from None
    from lmkiln.infer.batching import BatchScheduler, ContinuousBatcher
    from lmkiln.infer.chat import ChatFormat
    from lmkiln.serve.app import ServeSettings, create_app

    chat_model = load_chat_model(args.run_dir, args.device, args.max_context)
    chat_format = ChatFormat.for_model(chat_model, args.mode)
    context = chat_model.model.cfg.block_size
    settings = ServeSettings(
        model_name=args.model_name or chat_model.name,
        context=context,
        api_key=api_key,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens=args.max_tokens,
    )
    batcher = ContinuousBatcher(chat_model.model, chat_model.tokenizer, max_rows=args.max_batch)
    scheduler = BatchScheduler(batcher, max_waiting=args.max_queue)
    sock = server.bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def started() -> None:
        print(f"serving {settings.model_name} ({chat_model.source}) at {url}", flush=True)
        print(
            f"  {chat_format.describe()}; context {context} tokens, batches of up to {args.max_batch}, "
            f"{args.max_queue} waiting at most{'; API key required' if api_key else ''}",
            flush=True,
        )
        print(f"  OpenAI API: {url}/v1   chat page: {url}/   health: {url}/health", flush=True)

    def stopped() -> None:
        outcomes = ", ".join(
            f"{reason} {count}" for reason, count in sorted(scheduler.stats()["finished"].items())
        )
        print(f"server stopped; requests by outcome: {outcomes or 'none'}", flush=True)

    app = create_app(scheduler, chat_format, settings)
    server.run(app, scheduler, sock, on_started=started, on_stopped=stopped)
    return 0


def cmd_finetune(args: argparse.Namespace, extra: list[str]) -> int:
    flags = ["task=finetune"]
    for key in ("base", "data", "format", "method", "objective"):
        if getattr(args, key):
            flags.append(f"finetune.{key}={getattr(args, key)}")
    recipe = "preference" if args.format == "preference" else f"sft-{args.format or 'instruction'}"
    cfg = _load(args, [*extra, *flags], default_recipe=recipe)
    _run_task(cfg, args)
    return 0


def cmd_eval(args: argparse.Namespace, extra: list[str]) -> int:
    from pathlib import Path

    if bool(args.task) == bool(args.harness):
        raise LmkilnError(
            "lmkiln eval needs --task TASK (a task file) or --harness TASKS (lm-eval), not both"
        )
    if args.harness:
        return _eval_harness(args, extra)
    from lmkiln.eval.runner import evaluate_run, write_result

    result = evaluate_run(
        args.run_dir,
        args.data,
        args.task,
        args.max_new_tokens,
        args.batch_size,
        args.limit,
        extra,
        args.device,
        args.candidates,
        args.beams,
        args.length_penalty,
    )
    out = Path(args.out) if args.out else Path(args.run_dir) / f"eval-{args.task}.json"
    write_result(result, out, {"run": str(args.run_dir), "data": str(args.data)})
    if args.task == "memorization":
        _print_canaries(result)
    else:
        print(f"{args.task} on {args.data}: {result.examples} examples in {result.seconds:.1f} s")
    print(result.table())
    print(f"results: {out}")
    return 0


def _eval_harness(args: argparse.Namespace, extra: list[str]) -> int:
    import json
    from pathlib import Path

    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")
    if args.include and not Path(args.include).exists():
        raise LmkilnError(f"--include {args.include}: no such task file or directory")
    try:
        from lm_eval.utils import make_table

        from lmkiln.eval.harness import run_harness
    except ImportError:
        raise LmkilnError("--harness needs lm-evaluation-harness: pip install 'lmkiln[harness]'") from None
    tasks = [t.strip() for t in args.harness.split(",") if t.strip()]
    results = run_harness(
        args.run_dir,
        tasks,
        include=args.include,
        limit=args.limit or None,
        batch_size=args.batch_size,
        device=args.device,
        num_fewshot=args.num_fewshot,
    )
    out = Path(args.out) if args.out else Path(args.run_dir) / "eval-harness.json"
    kept = {k: results[k] for k in ("results", "versions", "n-shot", "config") if k in results}
    out.write_text(json.dumps(kept, indent=1, default=str), encoding="utf-8")
    print(make_table(results))
    print(f"results: {out}")
    return 0


def _print_canaries(result) -> None:
    rows = [r for r in result.samples if "canary" in r]
    info = next(r for r in result.samples if "plot" in r)
    print(
        f"memorization: {len(rows)} canaries against {info['candidates']} random candidates each "
        f"(log2 |R| = {info['space_bits']:.1f} bits), {result.seconds:.1f} s"
    )
    print(f"{'canary':<34} {'copies':>6} {'bits':>8} {'exposure':>9} {'sampled':>8} {'extracted':>9}")
    for r in rows:
        print(
            f"{r['canary']:<34} {r['repeats']:>6} {r['log_perplexity_bits']:>8.2f} {r['exposure']:>9.2f} "
            f"{r['exposure_sampled']:>8.2f} {'yes' if r['extracted'] else 'no':>9}"
        )
    print(f"plot: {info['plot']}")


# --------------------------------------------------------------------------------------------
# Hugging Face interop and encoders


def cmd_export(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")
    if args.to == "gguf":
        return _export_gguf(args)
    from lmkiln.interop.hf_export import export_run, parse_size, verify_export

    report = export_run(
        args.run_dir,
        args.out_dir,
        dtype=args.dtype or "float32",
        max_shard_bytes=parse_size(args.max_shard_size),
        overwrite=args.overwrite,
    )
    print(
        f"exported {report.checkpoint} (step {report.step}) as {report.architecture}: "
        f"{report.parameters / 1e6:.2f}M parameters, {report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s"
    )
    print(f"  {report.out_dir}/: {', '.join(report.files)}")
    if args.verify:
        from lmkiln.runs.load import load_run

        loaded = load_run(args.run_dir)
        check = verify_export(loaded.model, loaded.tokenizer, report.out_dir, args.dtype or "float32")
        status = "ok" if check.tokens_equal and check.max_abs_logits_diff <= 1e-4 else "MISMATCH"
        print(
            f"verified with transformers: max |Δlogits| {check.max_abs_logits_diff:.2e}, token ids "
            f"{'identical' if check.tokens_equal else 'differ'}, chat template "
            f"{'identical' if check.template_equal else 'differs'} → {status}"
        )
        for problem in check.mismatches:
            print(f"  {problem}")
        if status != "ok":
            return 1
    print(f"load it: AutoModelForCausalLM.from_pretrained({str(report.out_dir)!r})")
    return 0


def _export_gguf(args: argparse.Namespace) -> int:
    from lmkiln.interop.gguf_export import export_gguf_from

    dtype = args.dtype or "f32"
    report = export_gguf_from(args.run_dir, args.out_dir, dtype=dtype, force=args.overwrite)
    print(
        f"exported {report.source} as GGUF ({report.architecture}, {dtype}): "
        f"{report.parameters / 1e6:.2f}M parameters, {report.tensors} tensors, "
        f"{report.bytes / 1e6:.1f} MB in {report.seconds:.2f} s"
    )
    chat = ", chat template" if report.chat_template else ""
    print(f"  {report.path}: tokenizer {report.tokenizer}{chat}")
    for note in report.notes:
        print(f"  note: {note}")
    if args.verify:
        from lmkiln.interop.gguf_verify import llama_cpp_available, verify_gguf

        if not llama_cpp_available():
            print(
                "not verified: llama_cpp is not installed (pip install 'lmkiln[llama]' builds llama.cpp; "
                "then rerun with --verify)"
            )
            return 0
        from lmkiln.interop.hf_import import load_pretrained

        loaded = load_pretrained(args.run_dir)
        parity = verify_gguf(loaded.model, loaded.tokenizer, report.path, dtype)
        print(f"verified with llama.cpp ({'ok' if parity.ok else 'MISMATCH'}):")
        for line in parity.lines():
            print(f"  {line}")
        for problem in parity.problems:
            print(f"  problem: {problem}")
        if not parity.ok:
            return 1
    print(f"run it: llama-cli -m {report.path}   (or Ollama: FROM {report.path} in a Modelfile)")
    return 0


def _read_texts(path: str, field: str, id_field: str | None) -> tuple[list[str], list]:
    """Texts (and ids) from a .jsonl file (one object per line) or a .txt file (one text per line)."""
    from pathlib import Path

    from lmkiln.encoders.data import read_jsonl, require_text

    if Path(path).suffix.lower() == ".txt":
        from lmkiln.data.corpus import iter_documents

        docs = [d for d in iter_documents(path, text_unit="line")]
        return [d.text for d in docs], [int(d.key.rsplit(":", 1)[1]) for d in docs]
    rows = read_jsonl(path, (field,), optional=(id_field,) if id_field else (), flags={field: "--field"})
    ids = [row.get(id_field, row["_line"]) if id_field else row["_line"] for row in rows]
    return [require_text(row, field, path) for row in rows], ids


def cmd_embed(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")
    from lmkiln.encoders.model import load_encoder
    from lmkiln.encoders.retrieval import check_embeddings_path, embed_texts, write_embeddings

    check_embeddings_path(args.out)
    texts, ids = _read_texts(args.data, args.field, args.id_field)
    loaded = load_encoder(args.model, pooling=args.pooling)
    max_length = args.max_length or loaded.meta.get("max_length", 128)
    vectors = embed_texts(
        loaded.model, loaded.tokenizer, texts, max_length=max_length, batch_size=args.batch_size
    )
    files = write_embeddings(args.out, vectors, ids, {"model": str(args.model), **loaded.meta})
    print(
        f"embedded {len(texts)} texts → {vectors.shape[1]}-dimensional unit vectors "
        f"({loaded.meta['pooling']} pooling): {', '.join(files)}"
    )
    return 0


def cmd_eval_retrieval(args: argparse.Namespace, extra: list[str]) -> int:
    if extra:
        raise LmkilnError(f"unexpected arguments: {_quote(extra)}")
    import json

    from lmkiln.encoders.data import read_jsonl, require_text
    from lmkiln.encoders.model import load_encoder
    from lmkiln.encoders.retrieval import evaluate_pairs

    rows = read_jsonl(
        args.pairs,
        (args.query_field, args.positive_field),
        flags={args.query_field: "--query-field", args.positive_field: "--positive-field"},
    )
    queries = [require_text(r, args.query_field, args.pairs) for r in rows]
    positives = [require_text(r, args.positive_field, args.pairs) for r in rows]
    loaded = load_encoder(args.model, pooling=args.pooling)
    ks = args.k
    found = evaluate_pairs(
        loaded.model,
        loaded.tokenizer,
        queries,
        positives,
        max_length=args.max_length or loaded.meta.get("max_length", 128),
        batch_size=args.batch_size,
        ks=ks,
    )
    if args.json:
        print(json.dumps({"pairs": len(rows), **found}))
        return 0
    print(
        f"{len(rows)} queries, {len(set(positives))} candidate documents ({loaded.meta['pooling']} pooling)"
    )
    for name, value in found.items():
        print(f"  {name:<10} {value:.4f}")
    return 0


def _add_interop_commands(sub: argparse._SubParsersAction) -> None:
    export = sub.add_parser(
        "export",
        help="export a trained run as a Hugging Face model directory or a GGUF file (llama.cpp)",
        allow_abbrev=False,
    )
    export.add_argument(
        "run_dir", help="run directory (or one of its checkpoints); gguf: also a HF model dir"
    )
    export.add_argument(
        "--to",
        choices=["hf", "gguf"],
        default="hf",
        help="hf: transformers directory; gguf: one llama.cpp file",
    )
    export.add_argument("out_dir", help="hf: directory to write; gguf: the .gguf file to write")
    export.add_argument(
        "--dtype", help="hf: float32 (default), bfloat16, float16; gguf: f32 (default), f16, q8_0"
    )
    export.add_argument("--max-shard-size", default="5GB", help="split model.safetensors above this size")
    export.add_argument(
        "--overwrite", "--force", action="store_true", help="replace a non-empty OUT_DIR or an existing file"
    )
    export.add_argument(
        "--verify",
        action="store_true",
        help="load the result with its consumer (transformers, or llama.cpp for gguf) and compare",
    )
    export.set_defaults(func=cmd_export)

    def encoder_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", help="local Hugging Face encoder directory or an encoder run directory")
        parser.add_argument(
            "--pooling", choices=["mean", "cls"], help="default: what the model saved, else mean"
        )
        parser.add_argument(
            "--max-length",
            type=NON_NEGATIVE_INT,
            default=0,
            help="tokens per text (default: saved, else 128)",
        )
        parser.add_argument("--batch-size", type=COUNT, default=32)

    embed = sub.add_parser("embed", help="write sentence embeddings of texts", allow_abbrev=False)
    encoder_options(embed)
    embed.add_argument(
        "--data", required=True, help=".jsonl (one object per line) or .txt (one text per line)"
    )
    embed.add_argument("--field", default="text", help="JSONL field holding the text")
    embed.add_argument("--id-field", help="JSONL field holding an id (default: the line number)")
    embed.add_argument("--out", required=True, help="FILE.npy (+ FILE.ids.json) or FILE.safetensors")
    embed.set_defaults(func=cmd_embed)

    evaluate = sub.add_parser(
        "eval-retrieval",
        help="recall@k and MRR of finding each query's positive among all positives",
        allow_abbrev=False,
    )
    encoder_options(evaluate)
    evaluate.add_argument("--pairs", required=True, help="JSONL with a query and a positive per line")
    evaluate.add_argument("--query-field", default="query")
    evaluate.add_argument("--positive-field", default="positive")
    evaluate.add_argument(
        "--k", type=_cutoffs, default=(1, 5, 10), help="comma-separated cut-offs for recall@k"
    )
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_eval_retrieval)


def _beam_options(parser: argparse.ArgumentParser, beams_help: str) -> None:
    parser.add_argument("--beams", type=COUNT, default=1, help=beams_help)
    parser.add_argument(
        "--length-penalty",
        type=_number(float),
        default=1.0,
        help="beam search: score = log-prob / length**this",
    )


def _sampling_options(parser: argparse.ArgumentParser, max_new_tokens_help: str | None = None) -> None:
    parser.add_argument("--max-new-tokens", type=COUNT, default=200, help=max_new_tokens_help)
    parser.add_argument("--temperature", type=_number(float, 0), default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=NON_NEGATIVE_INT, default=0, help="0 = no top-k filter")
    parser.add_argument("--top-p", type=_number(float, 0, 1, low_open=True), default=1.0)
    parser.add_argument("--seed", type=NON_NEGATIVE_INT, default=None)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def _add_use_commands(sub: argparse._SubParsersAction) -> None:
    model_help = "run directory (or one of its checkpoints), or a local Hugging Face model directory"
    mode_help = "chat: the chat template; completion: continue plain text; auto: chat if trained for it"
    context_help = "cap on an imported Hugging Face model's context in tokens (0: none)"
    chat = sub.add_parser(
        "chat",
        help="talk to a model in the terminal",
        description="Talk to a model: streamed answers, history trimmed to the context. Commands: "
        "/reset, /system TEXT, /quit.",
        allow_abbrev=False,
    )
    chat.add_argument("run_dir", help=model_help)
    chat.add_argument("--mode", choices=["auto", "chat", "completion"], default="auto", help=mode_help)
    chat.add_argument("--system", help="system message to start with")
    _sampling_options(chat, "tokens per answer at most")
    chat.add_argument("--device", type=_device, default="cpu")
    chat.add_argument("--max-context", type=NON_NEGATIVE_INT, default=4096, help=context_help)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with a chat page",
        description="OpenAI-compatible /v1/models, /v1/completions and /v1/chat/completions (streaming "
        "or not), continuous batching of concurrent requests, /health, and a chat page at /.",
        allow_abbrev=False,
    )
    serve.add_argument("run_dir", help=model_help)
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to bind; other than loopback needs --api-key"
    )
    serve.add_argument("--port", type=_number(int, 0, 65535), default=8000, help="port (0 picks a free one)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` (default: $LMKILN_API_KEY)")
    serve.add_argument("--model-name", help="model id in the API (default: the directory name)")
    serve.add_argument("--mode", choices=["auto", "chat", "completion"], default="auto", help=mode_help)
    serve.add_argument("--max-batch", type=COUNT, default=8, help="requests decoded together at most")
    serve.add_argument("--max-queue", type=COUNT, default=64, help="requests waiting at most (429 beyond)")
    serve.add_argument(
        "--max-tokens", type=NON_NEGATIVE_INT, default=0, help="tokens per request at most (0: the context)"
    )
    serve.add_argument(
        "--max-prompt-tokens",
        type=NON_NEGATIVE_INT,
        default=0,
        help="prompt tokens at most (0: the context minus one)",
    )
    serve.add_argument("--max-body-bytes", type=COUNT, default=1 << 20, help="request body size at most")
    serve.add_argument("--device", type=_device, default="cpu")
    serve.add_argument("--max-context", type=NON_NEGATIVE_INT, default=4096, help=context_help)
    serve.set_defaults(func=cmd_serve)


# --------------------------------------------------------------------------------------------
# Parser and entry point


def cmd_plan(args: argparse.Namespace, extra: list[str]) -> int:
    from lmkiln.plan import parse_duration, parse_memory
    from lmkiln.plan.text import format_plan, plan_with_data

    if args.device:
        extra = [*extra, f"train.device={args.device}"]
    cfg = _load(args, extra)
    memory = parse_memory(args.memory) if args.memory else None
    budget = parse_duration(args.time) if args.time else None
    plan = plan_with_data(cfg, memory, budget)
    print(format_plan(plan))
    if args.save:
        from lmkiln.files import write_json_atomic

        write_json_atomic(args.save, plan.summary())
        print(f"plan saved to {args.save} (put it in the run directory as plan.json for `lmkiln report`)")
    return 0


def cmd_report(args: argparse.Namespace, extra: list[str]) -> int:
    from lmkiln.report import write_report

    print(f"report: {write_report(args.runs, args.out, args.samples)}")
    return 0


def cmd_runs(args: argparse.Namespace, extra: list[str]) -> int:
    from lmkiln.report import list_runs, runs_table

    records = list_runs(args.dir)
    print(runs_table(records, Path(args.dir)) if records else f"no runs under {args.dir}")
    return 0


def cmd_sweep(args: argparse.Namespace, extra: list[str]) -> int:
    from lmkiln.sweep.search import read_space, sweep

    space = read_space(args.space)
    base = _load(args, extra)
    directory = args.dir or f"runs/{base.name}-sweep"

    def make_config(trial_overrides: list[str]):
        return _load(args, [*extra, *trial_overrides])

    result = sweep(make_config, space, directory, args.trials, args.parallel, args.metric, args.pruner)
    print(result.table)
    print(f"best: {args.metric} {result.best_value:.4f} with {result.best_params}")
    print(f"best config delta: {result.best_file}" + (f"; plot: {result.plot}" if result.plot else ""))
    return 0


def cmd_lr_find(args: argparse.Namespace, extra: list[str]) -> int:
    from lmkiln.sweep.lr_find import lr_range_test, plot_range_test

    cfg = _load(args, extra)
    result = lr_range_test(cfg, args.steps, args.start, args.end)
    shown = range(0, len(result.lrs), max(1, len(result.lrs) // 12))
    print("lr          smoothed loss")
    for i in shown:
        print(f"{result.lrs[i]:<11.3g} {result.losses[i]:.4f}")
    if result.diverged_at:
        print(f"stopped at lr {result.diverged_at:.3g}: the loss passed 4x its minimum")
    plot = plot_range_test(result, args.plot) if args.plot else None
    print(
        f"suggested optim.lr={result.suggestion:.3g} (steepest descent)" + (f"; plot: {plot}" if plot else "")
    )
    return 0


def _write_run_report(run_dir) -> None:
    """Every run ends with its report.html; a failure to write it never fails the run."""
    from lmkiln.report import write_report

    try:
        print(f"report: {write_report([run_dir], samples=0)}")
    except Exception as err:  # the run itself succeeded
        log.warning("could not write the HTML report: %s", err)


def _add_plan_commands(sub: argparse._SubParsersAction) -> None:
    plan = _config_parser(
        "plan", "predict a run's memory and time on this machine and recommend a size and batch", sub
    )
    plan.add_argument("--memory", help="memory to fit, e.g. 24GiB: picks the micro-batch and checkpointing")
    plan.add_argument("--time", help="time budget, e.g. 10m: the compute-optimal model size for it")
    plan.add_argument("--device", choices=["cpu", "cuda"], help="plan for this device (train.device)")
    plan.add_argument("--save", metavar="FILE", help="also write the plan's figures as JSON")
    plan.set_defaults(func=cmd_plan)
    report = sub.add_parser("report", help="write a self-contained HTML report of one or more runs")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="where to write it (default RUN_DIR/report.html of the first run)")
    report.add_argument(
        "--samples", type=NON_NEGATIVE_INT, default=2, help="samples to generate per run (0 = none)"
    )
    report.set_defaults(func=cmd_report)
    sweep = _config_parser("sweep", "tune hyper-parameters with Optuna (TPE, pruning, resumable)", sub)
    sweep.add_argument(
        "--space", required=True, help="YAML file: config key -> {low, high, log} or {choices}"
    )
    sweep.add_argument("--trials", type=COUNT, default=10, help="trials the study should hold when done")
    sweep.add_argument(
        "--parallel", type=COUNT, default=1, help="trials run at once (threads of this process)"
    )
    sweep.add_argument(
        "--dir", help="sweep directory (default runs/NAME-sweep): study.db, trial-NNN/, best.yaml"
    )
    sweep.add_argument("--metric", default="val_loss", help="validation metric to minimise")
    sweep.add_argument("--pruner", default="median", choices=["median", "halving", "none"])
    sweep.set_defaults(func=cmd_sweep)
    lr_find = _config_parser("lr-find", "learning-rate range test: a quick first guess for optim.lr", sub)
    lr_find.add_argument("--steps", type=_number(int, 10), default=100)
    lr_find.add_argument("--start", type=_number(float, 0, low_open=True), default=1e-6)
    lr_find.add_argument("--end", type=_number(float, 0, low_open=True), default=1.0)
    lr_find.add_argument("--plot", metavar="PNG", help="write the loss-by-rate curve here")
    lr_find.set_defaults(func=cmd_lr_find)
    runs = sub.add_parser("runs", help="list runs under a directory with their final metrics")
    runs.add_argument("dir", nargs="?", default="runs", metavar="DIR")
    runs.set_defaults(func=cmd_runs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lmkiln",
        allow_abbrev=False,
        description="Build language models from scratch and fine-tune them.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=f"lmkiln {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = _config_parser(
        "train", "train a model (default: the `default` recipe on the built-in corpus)", sub
    )
    train.add_argument(
        "--resume", metavar="auto|PATH", help="continue from the newest complete checkpoint or PATH"
    )
    train.add_argument(
        "--force", action="store_true", help="resume even if batch/model/data settings changed"
    )
    train.add_argument(
        "--overwrite", action="store_true", help="delete an existing run directory and start over"
    )
    train.add_argument(
        "--nproc", type=COUNT, default=None, help="launch N processes with torchrun on this machine"
    )
    train.set_defaults(func=cmd_train)

    finetune = _config_parser(
        "finetune",
        "fine-tune a trained model on a task file (default recipe: sft-FORMAT, or preference)",
        sub,
    )
    finetune.add_argument(
        "--base", help="the model to fine-tune: an lmkiln run directory, or scratch (finetune.base)"
    )
    finetune.add_argument("--data", help="training examples: .jsonl, .csv or .parquet (finetune.data)")
    finetune.add_argument(
        "--format",
        choices=["instruction", "chat", "translation", "summarization", "qa", "classification", "preference"],
        help="task format of the rows (default instruction; preference: prompt, chosen, rejected)",
    )
    finetune.add_argument("--method", choices=["full", "freeze", "lora"], help="what to train (default full)")
    finetune.add_argument(
        "--objective",
        choices=["sft", "dpo", "orpo"],
        help="what is minimised (finetune.objective): sft, or dpo/orpo for --format preference",
    )
    finetune.add_argument(
        "--resume", metavar="auto|PATH", help="continue from the newest complete checkpoint"
    )
    finetune.add_argument("--force", action="store_true", help="resume even if settings changed")
    finetune.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    finetune.set_defaults(func=cmd_finetune)
    _add_plan_commands(sub)

    evaluate = sub.add_parser(
        "eval",
        help="task metrics of a trained run on a task file, or lm-evaluation-harness tasks (--harness)",
        description="Task metrics of a run on a task file; extra section.key=VALUE arguments override the "
        "run's finetune settings (e.g. finetune.fields output=completion).",
        allow_abbrev=False,
    )
    evaluate.add_argument("run_dir", help="run directory (or one of its checkpoints)")
    evaluate.add_argument(
        "--data",
        help="task file: .jsonl, .csv or .parquet (not for memorization: it reads the run's canaries)",
    )
    what = evaluate.add_mutually_exclusive_group(required=True)  # a task file's metric, or lm-eval tasks
    what.add_argument(
        "--harness",
        metavar="TASKS",
        help="run lm-evaluation-harness tasks (comma-separated names from its registry or --include)",
    )
    evaluate.add_argument("--include", metavar="PATH", help="--harness: a directory of local task YAMLs")
    evaluate.add_argument(
        "--num-fewshot", type=NON_NEGATIVE_INT, help="--harness: few-shot examples per prompt"
    )
    what.add_argument(
        "--task",
        choices=[
            "instruction",
            "chat",
            "translation",
            "summarization",
            "qa",
            "classification",
            "preference",
            "perplexity",
            "memorization",
        ],
    )
    evaluate.add_argument(
        "--candidates",
        type=COUNT,
        default=2000,
        help="memorization: random candidates each canary is ranked among",
    )
    evaluate.add_argument("--max-new-tokens", type=COUNT, default=64)
    _beam_options(evaluate, "beam search width (1 = greedy)")
    evaluate.add_argument("--batch-size", type=COUNT, default=16)
    evaluate.add_argument(
        "--limit", type=NON_NEGATIVE_INT, default=0, help="evaluate the first N examples only (0 = all)"
    )
    evaluate.add_argument("--out", help="results JSON (default RUN_DIR/eval-TASK.json)")
    evaluate.add_argument("--device", type=_device, default="cpu")
    evaluate.set_defaults(func=cmd_eval)

    sub.add_parser("recipes", help="list the built-in recipes").set_defaults(func=cmd_recipes)
    sub.add_parser("presets", help="list the model size presets").set_defaults(func=cmd_presets)

    tokenizer = sub.add_parser("tokenizer", help="tokenizer commands")
    tok_sub = tokenizer.add_subparsers(dest="tokenizer_command", metavar="COMMAND", required=True)
    tok_train = _config_parser("train", "train a tokenizer on the config's corpus", tok_sub)
    tok_train.add_argument("--out", required=True, help="directory for tokenizer.json")
    tok_train.set_defaults(func=cmd_tokenizer_train)

    data = sub.add_parser("data", help="data commands")
    data_sub = data.add_subparsers(dest="data_command", metavar="COMMAND", required=True)
    prepare = _config_parser("prepare", "tokenize the config's corpus into cached token shards", data_sub)
    prepare.set_defaults(func=cmd_data_prepare)
    audit = _config_parser(
        "audit",
        "report duplicates, PII/secrets, scripts and sizes of a corpus, or the contamination of eval files",
        data_sub,
    )
    audit.add_argument(
        "corpus", nargs="?", help="corpus to audit (a file, directory, glob, builtin:pydoc or builtin:stdlib)"
    )
    audit.add_argument("--train", help="training corpus to check --eval files against (default: CORPUS)")
    audit.add_argument(
        "--eval", nargs="+", metavar="FILE", help="evaluation files (.jsonl/.csv/.parquet/.txt)"
    )
    audit.add_argument("--ngram", type=COUNT, default=13, help="contamination: words per n-gram (GPT-3: 13)")
    audit.add_argument(
        "--decontaminate", metavar="DIR", help="write each eval file without contaminated examples"
    )
    audit.add_argument(
        "--tokenizer", help="count tokens with this tokenizer.json, its directory or a run directory"
    )
    audit.add_argument("--types", help="PII/secret types to look for, comma-separated (default: all)")
    audit.add_argument("--no-dedup", action="store_true", help="skip the duplicate search")
    audit.add_argument("--json", action="store_true", help="print JSON instead of the summary")
    audit.add_argument("--out", help="also write the audit as JSON to this file")
    audit.set_defaults(func=cmd_data_audit)

    generate = sub.add_parser("generate", help="sample text from a trained run", allow_abbrev=False)
    generate.add_argument("run_dir", help="run directory (or one of its checkpoints)")
    generate.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    _sampling_options(generate)
    generate.add_argument("--device", type=_device, default="cpu")
    _beam_options(generate, "beam search width (>1 ignores sampling)")
    generate.set_defaults(func=cmd_generate)
    _add_use_commands(sub)
    _add_interop_commands(sub)
    return parser


def _version() -> str:
    from lmkiln import __version__

    return __version__


class _Formatter(logging.Formatter):
    """INFO lines as plain text; warnings and errors prefixed with their level."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        return text if record.levelno == logging.INFO else f"{record.levelname.lower()}: {text}"


def _setup_logging(debug: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.WARNING)
    quiet = os.environ.get("RANK", "0") != "0"  # only rank 0 talks; the others report problems only
    logging.getLogger("lmkiln").setLevel(
        logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    )


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def normalize_argv(argv: list[str]) -> list[str]:
    """Accept `--debug` anywhere (argparse wants it before the subcommand)."""
    if "--debug" in argv[1:]:
        argv = ["--debug"] + [a for a in argv if a != "--debug"]
    return argv


def main(argv: list[str] | None = None) -> int:
    argv = normalize_argv(list(sys.argv[1:] if argv is None else argv))
    debug = "--debug" in argv
    _setup_logging(debug)
    parser = build_parser()
    if not argv or argv == ["--debug"]:
        argv = [*argv, "--help"]
    try:
        args, extra = parser.parse_known_args(argv)
        func: Callable | None = getattr(args, "func", None)
        if func is None:
            parser.print_help()
            return 2
        with cleanup_on_failure():  # a failing command leaves nothing half-written behind
            return func(args, extra)
    except _HelpShown:
        return 0
    except BrokenPipeError:  # `lmkiln recipes | head -1`: the reader left; nothing to report
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a command killed by a broken pipe
    except LmkilnError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:  # the file-system mistakes a user can make: full, read-only, missing, ...
        if debug:
            raise
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return LmkilnError.exit_code
    except Interrupted as err:
        where = f"; checkpoint {err.checkpoint}" if err.checkpoint else ""
        print(f"{err}{where}. Continue with the same command plus --resume auto", file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
