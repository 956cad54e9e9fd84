"""Command line: `selfextend generate | eval | calibrate | plan | serve | info`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from . import models
from .allocator import map_large_allocations
from .config import CHOICES, FLAGS, check_request, training_length
from .errors import CommandError, NativeBuildError, UnsupportedModelError
from .inference import CHUNK_SIZE
from .integration import apply_plan
from .kv_cache import CACHE_DTYPES, cache_dtype
from .planning import Plan, find_profile, resolve, uses_profile
from .rotary import rope_parameters_of
from .samples import token_counter
from .weights import AUTO, WEIGHT_FORMATS, check_format, choose_format

EXIT_USAGE, EXIT_INTERRUPTED = 2, 130


def _read_input(path: str) -> str:
    if path == "-":
        text = sys.stdin.read()
    else:
        file = Path(path)
        if not file.is_file():
            raise CommandError(f"input file not found: {path}")
        text = file.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise CommandError(f"input {'(stdin)' if path == '-' else path} is empty")
    return text


def _source(args) -> models.ModelSource:
    try:
        return models.resolve(args.model)
    except models.ModelNotFoundError as error:
        raise CommandError(str(error)) from error


def _document(args, tokenizer) -> tuple[str, str, str | None]:
    """The document text, the question and (for a generated passkey sample) the key to find."""
    if args.input is not None:
        return _read_input(args.input), args.prompt or "", None
    from .samples import passkey_sample

    sample = passkey_sample(token_counter(tokenizer), args.sample_tokens, depth=args.sample_depth)
    print(f"[sample] passkey document of ~{args.sample_tokens} tokens; the key is {sample.answer}",
          file=sys.stderr)
    return sample.text, args.prompt or sample.question, sample.answer


def _prompt_ids(tokenizer, text: str, question: str, chat: bool):
    """Token ids of the document followed by the question (in the chat template with --chat)."""
    prompt = f"{text.strip()}\n\n{question}" if question else text.strip()
    if chat:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             return_tensors="pt", return_dict=True)["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def _request(args) -> dict:
    """The settings the command line gives: method, G/W, S/w and E (None where not given)."""
    return {"method": args.method, "group_size": getattr(args, "group_size", None),
            "window_size": getattr(args, "window", None), "shifted_offset": args.shifted_offset,
            "local_window": args.local_window, "effective_length": args.effective_length}


def _check_flags(args) -> None:
    """Refuse settings that cannot go together before any model is loaded."""
    try:
        check_request(**_request(args), names=FLAGS)
    except ValueError as error:
        raise CommandError(str(error)) from error


def _load_model(args, source: models.ModelSource):
    """The model the run options ask for (device, dtype, weight format), a bad combination refused first."""
    try:
        weights, lost = choose_format(args.weights, args.device, args.dtype)
        check_format(weights, args.device, args.dtype)
    except (ValueError, NativeBuildError) as error:
        raise CommandError(str(error)) from error
    if lost:
        print(f"selfextend: {lost}", file=sys.stderr)
    return models.load_model(source, device=args.device, dtype=args.dtype, weights=weights)


def _kv_cache_dtype(args):
    """The KV cache's dtype the flags ask for (None: the model's), a bad combination refused before loading."""
    try:
        return cache_dtype(args.kv_cache_dtype, getattr(torch, args.dtype), args.device)
    except ValueError as error:
        raise CommandError(str(error)) from error


def _settings(args, model_or_config, length: int) -> Plan:
    """The plan for `length` tokens from the flags (given settings, or the planner's), errors as the user's."""
    try:
        return resolve(model_or_config, length, **_request(args), names=FLAGS)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from error


def cmd_generate(args) -> None:
    from transformers import TextStreamer

    from .inference import answer, pad_id, prefill

    if args.input is None and args.sample_tokens is None:
        raise CommandError("give --input FILE (or - for stdin), or --sample-tokens N for a generated passkey document")
    _check_flags(args)
    kv_dtype = _kv_cache_dtype(args)
    source = _source(args)
    tokenizer = models.load_tokenizer(source)
    text, question, key = _document(args, tokenizer)
    started = time.perf_counter()
    model = _load_model(args, source)
    ids = _prompt_ids(tokenizer, text, question, args.chat).to(args.device)
    n = ids.shape[1]
    train_length = training_length(model)
    chosen = _settings(args, model, n + args.max_new_tokens)
    try:
        apply_plan(model, chosen)
    except (UnsupportedModelError, ValueError, TypeError) as error:
        raise CommandError(str(error)) from error
    print(f"[selfextend] {n} prompt tokens, training length {train_length}: {chosen.settings.describe()}, limit "
          f"{chosen.max_length} ({chosen.reason}); "
          f"model loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    prefill_start = time.perf_counter()
    cache = prefill(model, ids, args.chunk_size, progress=not args.quiet, capacity=n + args.max_new_tokens,
                    cache_dtype=kv_dtype)
    prefill_seconds = time.perf_counter() - prefill_start
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    decode_start = time.perf_counter()
    new = answer(model, ids, cache, args.max_new_tokens, pad_id(tokenizer), streamer)
    decode_seconds = time.perf_counter() - decode_start
    print(f"[selfextend] prefill {n} tokens in {prefill_seconds:.1f}s ({n / max(prefill_seconds, 1e-9):.0f} tok/s); "
          f"{len(new)} new tokens in {decode_seconds:.2f}s ({len(new) / max(decode_seconds, 1e-9):.1f} tok/s)",
          file=sys.stderr)
    if key is not None:
        from .evaluation.tasks import is_correct

        found = is_correct((key,), tokenizer.decode(new, skip_special_tokens=True))
        print(f"[sample] the answer {'contains' if found else 'does NOT contain'} the key {key}", file=sys.stderr)


def cmd_plan(args) -> None:
    source = _source(args)
    if args.length is None:
        if args.input is None:
            raise CommandError("give --length N or --input FILE")
        tokenizer = models.load_tokenizer(source)
        args.length = len(tokenizer(_read_input(args.input)).input_ids)
    _check_flags(args)  # before loading: the model's weights are needed only to identify its measured profile
    model = models.load_model(source) if uses_profile(**_request(args)) else models.load_config(source)
    chosen = _settings(args, model, args.length)
    if args.json:
        print(json.dumps(chosen.as_dict()))
        return
    for label, value in chosen.describe():
        print(f"{label:<28} {value:>10}")
    print(f"why: {chosen.reason}")


def model_info(config) -> dict:
    """Family, RoPE settings, training length and which layers SelfExtend extends."""
    text = config.get_text_config()
    rope = rope_parameters_of(text)
    layer_types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
    if getattr(text, "sliding_window", None) and getattr(text, "layer_types", None) is None:
        if getattr(text, "use_sliding_window", True):
            layer_types = ["sliding_attention"] * text.num_hidden_layers
    extended = [i for i, kind in enumerate(layer_types) if kind == "full_attention"]
    return {"family": text.model_type, "rope_type": rope.get("rope_type", "default"),
            "rope_theta": rope.get("rope_theta"), "training_length": training_length(config),
            "layers": len(layer_types), "extended_layers": extended,
            "local_layers": [i for i in range(len(layer_types)) if i not in extended],
            "sliding_window": getattr(text, "sliding_window", None)}


def _profile_info(model) -> dict | None:
    profile = find_profile(model)
    if profile is None:
        return None
    return {"effective_length": profile.effective_length, "threshold": profile.threshold,
            "accuracy": {n: f"{a['correct']}/{a['total']}" for n, a in sorted(profile.accuracy.items())},
            "compared": {m: {n: f"{a['correct']}/{a['total']}" for n, a in sorted(r.items())}
                         for m, r in sorted(profile.methods.items())},
            "measured": profile.created, "file": str(profile.path)}


def cmd_info(args) -> None:
    model = models.load_model(_source(args))
    info = {**model_info(model.config), "profile": _profile_info(model)}
    if args.json:
        print(json.dumps(info))
        return
    profile = info.pop("profile")
    for key, value in info.items():
        print(f"{key:<16} {value}")
    if profile is None:
        print(f"{'profile':<16} none: planned against the training length (`selfextend calibrate` measures E)")
        return
    print(f"{'effective_length':<16} {profile['effective_length']} (accuracy >= {profile['threshold']}; "
          f"measured {profile['measured']}, {profile['file']})")
    print(f"{'probed':<16} " + ", ".join(f"{n}: {a}" for n, a in profile["accuracy"].items()))
    for method, results in profile["compared"].items():
        print(f"{'compared':<16} {method}: " + ", ".join(f"{n}: {a}" for n, a in results.items()))


def cmd_calibrate(args) -> None:
    from .evaluation.calibration import CalibrationError, Probes, calibrate, compare
    from .planning import save_profile

    try:
        probes = Probes(tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                        tuple(_floats(args.depths, "--depths")), args.threshold, args.chunk_size)
    except CalibrationError as error:
        raise CommandError(str(error)) from error
    if args.budget is not None and args.budget <= 0:
        raise CommandError(f"--budget must be a positive number of minutes, got {args.budget}")
    source = _source(args)
    tokenizer = models.load_tokenizer(source)
    model = _load_model(args, source)
    profile = find_profile(model) if args.compare else None
    if profile is not None:
        print(f"[calibrate] comparing against the measured E = {profile.effective_length} ({profile.path})",
              file=sys.stderr)
    try:
        if profile is None:
            profile = calibrate(model, tokenizer, args.model or models.DEFAULT_MODEL, probes, start=args.start,
                                resolution=args.resolution, budget_minutes=args.budget, progress=not args.quiet)
        if args.compare:
            lengths = _lengths(args.compare_lengths) if args.compare_lengths else None
            profile = compare(model, tokenizer, profile, probes, lengths, progress=not args.quiet)
    except CalibrationError as error:
        raise CommandError(str(error)) from error
    path = save_profile(profile, args.out)
    for length, result in sorted(profile.accuracy.items()):
        print(f"{length:>8} tokens  {result['correct']}/{result['total']}  {'pass' if result['passed'] else 'fail'}")
    budget = " (stopped by --budget: E may be longer)" if profile.stopped_by_budget else ""
    print(f"effective length E = {profile.effective_length} of training length {profile.train_length}{budget}; "
          f"{profile.seconds / 60:.1f} min")
    for method, results in sorted(profile.methods.items()):
        print(f"{method:>10}: " + ", ".join(f"{n} tokens {r['correct']}/{r['total']}" for n, r in sorted(results.items())))
    print(f"[calibrate] profile written to {path}", file=sys.stderr)


def _lengths(text: str) -> list[int]:
    """`4k,8k,6000` → [4096, 8192, 6000] (k = 1024 tokens)."""
    try:
        return [int(float(item[:-1]) * 1024) if item.lower().endswith("k") else int(item)
                for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise CommandError(f"bad --lengths {text!r}: give token counts like 4k,8k,6000") from error


def _floats(text: str, flag: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",") if item.strip()]
    except ValueError as error:
        raise CommandError(f"bad {flag} {text!r}: give numbers like 0,0.5,1") from error


def cmd_eval(args) -> None:
    from .evaluation import (PERPLEXITY, Evaluation, Method, evaluate, format_table, nll_by_position, plot,
                             summarize, write_csv)

    try:
        methods = Method.parse_list(args.methods)
        options = {"digits": args.digits} if args.digits is not None else {}
        ev = Evaluation(args.task, _lengths(args.lengths), methods, args.model or models.DEFAULT_MODEL,
                        depths=_floats(args.depths, "--depths"), samples=args.samples, seed=args.seed,
                        chunk_size=args.chunk_size, bucket=args.bucket, options=options,
                        effective_length=args.effective_length, kv_cache_dtype=args.kv_cache_dtype)
    except ValueError as error:
        raise CommandError(str(error)) from error
    _kv_cache_dtype(args)  # refused before the model loads
    source = _source(args)
    tokenizer = models.load_tokenizer(source)
    model = _load_model(args, source)
    out = Path(args.out)
    try:
        rows = evaluate(model, tokenizer, ev, out, progress=not args.quiet)
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from error
    summary = summarize([r for r in rows if r["task"] == ev.task])
    write_csv(summary, out / "summary.csv")
    pictures = plot(rows, out)
    print(format_table(summary))
    if ev.task == PERPLEXITY:
        print(nll_by_position([r for r in rows if r["task"] == ev.task]))
    print(f"[eval] {out / 'results.jsonl'}, {out / 'summary.csv'}, " + ", ".join(str(p) for p in pictures),
          file=sys.stderr)


def cmd_serve(args) -> None:
    """Load the model once and serve it over HTTP until interrupted."""
    try:
        from .serving.app import ServerOptions
        from .serving.engine import Engine, request_planner
        from .serving.metrics import Metrics
        from .serving.server import serve
    except ImportError as error:
        raise CommandError(f"selfextend serve needs the serve extra: pip install 'selfextend[serve]' ({error})")
    for flag, value in (("--max-queue", args.max_queue), ("--max-tokens-cap", args.max_tokens_cap),
                        ("--default-max-tokens", args.default_max_tokens), ("--chunk-size", args.chunk_size),
                        ("--max-body-mb", args.max_body_mb)):
        if value <= 0:
            raise CommandError(f"{flag} must be positive, got {value}")
    if args.prefix_cache_mb < 0:
        raise CommandError(f"--prefix-cache-mb must be >= 0, got {args.prefix_cache_mb}")
    _check_flags(args)
    kv_dtype = _kv_cache_dtype(args)
    template = None
    if args.chat_template is not None:
        path = Path(args.chat_template)
        if not path.is_file():
            raise CommandError(f"chat template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    source = _source(args)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tokenizer = models.load_tokenizer(source)
    model = _load_model(args, source)
    try:
        planner = request_planner(model, **_request(args))
    except (ValueError, TypeError) as error:
        raise CommandError(str(error)) from error
    engine = Engine(model, tokenizer, planner, Metrics(), chunk_size=args.chunk_size, max_queue=args.max_queue,
                    prefix_cache_bytes=int(args.prefix_cache_mb * 2**20), cache_dtype=kv_dtype)
    options = ServerOptions(args.served_model_name or args.model or models.DEFAULT_MODEL, args.api_key,
                            int(args.max_body_mb * 2**20), args.max_tokens_cap, args.default_max_tokens, template)
    serve(engine, options, args.host, args.port, args.log_level)


MODEL_HELP = (f"model folder, .gguf file, cached hub id, {models.SMOLLM2!r} or 'testbed' "
              f"(default: embedded {models.DEFAULT_MODEL})")


def _add_model(parser: argparse.ArgumentParser, help: str = MODEL_HELP) -> None:
    parser.add_argument("--model", help=help)


def _add_settings(parser: argparse.ArgumentParser, given: str = "") -> None:
    """The settings flags of every command that plans: method, G and W, STRING's S and w, and E."""
    parser.add_argument("--method", default="auto", choices=CHOICES,
                        help="position map: auto (default: SelfExtend, or STRING inside the training length where "
                             "the model's profile measured it better), selfextend, or string (STRING, inside the "
                             "training length only)")
    parser.add_argument("--group-size", type=int, metavar="G", help=f"SelfExtend's G, with --window{given} "
                                                                      "(default: planned)")
    parser.add_argument("--window", type=int, metavar="W", help=f"SelfExtend's W, with --group-size{given}")
    parser.add_argument("--shifted-offset", type=int, metavar="S", help="STRING: distances from S on are shifted "
                                                                         "(default: training length / 3)")
    parser.add_argument("--local-window", type=int, metavar="w", help="STRING: where shifted distances start "
                                                                      "(default 128)")
    _add_effective_length(parser)


def _add_effective_length(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--effective-length", type=int, metavar="E",
                        help="plan G and W against this length instead of the model's measured profile")


WEIGHTS_HELP = ("how linear weights are stored: dense (as --dtype), float16 or int8 (CPU, float32 compute; lighter "
                "and faster to decode; int8 builds a C kernel with the system's compiler on first use), or auto: "
                "int8 on CPU with float32 compute where a C compiler builds it, dense elsewhere (saying so on CPU)")


KV_CACHE_HELP = ("what the KV cache stores keys and values in: model (the model's dtype), float16 (float32 models "
                 "on CPU: half the cache's memory and of the bytes a decode step reads it in; keys and values "
                 "rounded once), or auto: float16 where it applies, the model's dtype elsewhere")


def _add_kv_cache_option(parser: argparse.ArgumentParser, default: str = "auto",
                         choices: tuple[str, ...] = CACHE_DTYPES) -> None:
    """--kv-cache-dtype, for the commands whose every run reads the cache through SelfExtend's attention."""
    parser.add_argument("--kv-cache-dtype", default=default, choices=choices,
                        help=f"{KV_CACHE_HELP} (default {default})")


def _add_run_options(parser: argparse.ArgumentParser, quiet: bool = True, weights: str = AUTO) -> None:
    """Options of every command that runs the model; `weights` the default format (measuring commands: dense)."""
    parser.add_argument("--chunk-size", type=int, default=CHUNK_SIZE,
                        help=f"prefill tokens per forward pass (default {CHUNK_SIZE})")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--weights", default=weights, choices=(AUTO, *WEIGHT_FORMATS),
                        help=f"{WEIGHTS_HELP} (default {weights})")
    if quiet:
        parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_serve_options(parser: argparse.ArgumentParser) -> None:
    """The server's own flags."""
    parser.add_argument("--served-model-name", help="the name clients give as `model` (default: from --model)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("SELFEXTEND_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $SELFEXTEND_API_KEY, else none)")
    parser.add_argument("--chat-template", help="Jinja chat template file, for models without one")
    parser.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429")
    parser.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument("--default-max-tokens", type=int, default=512, help="max_tokens when a request gives none")
    parser.add_argument("--prefix-cache-mb", type=float, default=2048,
                        help="memory for kept prefixes, least recently used dropped first (0: no reuse)")
    parser.add_argument("--max-body-mb", type=float, default=16, help="largest request body")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfextend", description="SelfExtend long-context inference")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="answer about a long document, streaming the answer to stdout")
    gen.add_argument("--input", help="text file, or - for stdin")
    gen.add_argument("--sample-tokens", type=int, help="instead of --input, a generated passkey document of N tokens")
    gen.add_argument("--sample-depth", type=float, default=0.5, help="needle depth of the sample, 0..1")
    gen.add_argument("--prompt", help="question appended after the document")
    _add_model(gen)
    _add_settings(gen)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_run_options(gen)
    _add_kv_cache_option(gen)
    gen.set_defaults(run=cmd_generate)

    ev = sub.add_parser("eval", help="score methods side by side on a long-context task; resumable")
    ev.add_argument("task", help="passkey, niah, multikey, multivalue, vartrack, kv or perplexity")
    _add_model(ev)
    ev.add_argument("--lengths", required=True, help="input lengths in tokens, e.g. 16k,32k,48k (k = 1024)")
    ev.add_argument("--methods", default="vanilla,selfextend",
                    help="comma list of vanilla, selfextend[:G=..,W=..], string[:S=..,w=..], "
                         "linear|dynamic|yarn[:factor=..], truncated[:C=..] (each token reads only its last C "
                         "tokens, default L: the floor without any extension)")
    ev.add_argument("--depths", default="0.5", help="needle depths, 0..1, e.g. 0,0.25,0.5,0.75,1")
    ev.add_argument("--samples", type=int, default=1, help="samples (seeds) per length and depth")
    ev.add_argument("--seed", type=int, default=0, help="first seed")
    ev.add_argument("--digits", type=int, help="digits of the key or magic number (passkey: 5, others: 7)")
    ev.add_argument("--bucket", type=int, help="perplexity: tokens per position bucket (default: training length/8)")
    ev.add_argument("--out", required=True, help="output folder; a rerun resumes from its results.jsonl")
    _add_effective_length(ev)
    _add_run_options(ev, weights="dense")  # measurements are of the model as loaded unless asked
    _add_kv_cache_option(ev, "model", ("model", "float16"))  # measured as asked: no choice made for the user
    ev.set_defaults(run=cmd_eval)

    cal = sub.add_parser("calibrate", help="measure the model's effective length E and save it as its profile")
    _add_model(cal)
    cal.add_argument("--threshold", type=float, default=0.9, help="accuracy a length needs to pass (default 0.9)")
    cal.add_argument("--tasks", default="passkey,niah", help="probe tasks (default passkey,niah)")
    cal.add_argument("--depths", default="0.25,0.5,0.75", help="needle depths, a different key at each")
    cal.add_argument("--start", type=int, help="first length probed (default: training length / 8)")
    cal.add_argument("--resolution", type=int, help="stop bisecting at this gap (default: training length / 16)")
    cal.add_argument("--budget", type=float, help="stop after this many minutes (E is then a lower bound)")
    cal.add_argument("--compare", action="store_true",
                     help="also run the probes with SelfExtend and STRING between E and L (E: the model's profile "
                          "if it has one, else measured first); the planner then chooses by them")
    cal.add_argument("--compare-lengths", help="lengths for --compare (default: midway between E and L, and L - L/64)")
    cal.add_argument("--out", help="profile file (default: $SELFEXTEND_HOME/profiles/<model identity>.json)")
    _add_run_options(cal, weights="dense")
    cal.set_defaults(run=cmd_calibrate)

    pl = sub.add_parser("plan", help="choose G and W for an input length")
    _add_model(pl)
    pl.add_argument("--length", type=int, help="target length in tokens")
    pl.add_argument("--input", help="measure the length of this file (- for stdin) instead")
    _add_settings(pl)
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(run=cmd_plan)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the serve extra)")
    _add_model(serve, MODEL_HELP + "; fixed for the server's life")
    _add_settings(serve, given=", fixed for every request")
    _add_serve_options(serve)
    _add_run_options(serve, quiet=False)
    _add_kv_cache_option(serve)
    serve.set_defaults(run=cmd_serve)

    info = sub.add_parser("info", help="family, RoPE, training length and extended layers of a model")
    _add_model(info)
    info.add_argument("--json", action="store_true")
    info.set_defaults(run=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    map_large_allocations()  # blocks of 4 MB or more that find no free one get mappings (allocator.py)
    try:
        args.run(args)
    except (CommandError, UnsupportedModelError) as error:
        print(f"selfextend: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("\nselfextend: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
