"""``eek serve MODEL``: the command line of the HTTP server (``earlyexit_kernels.integrations.server``), one
process or Ray Serve replicas; with ``--calibration FILE``, the threshold certified at start-up on the
base served (:mod:`earlyexit_kernels.integrations.served_certificate`).
"""

from __future__ import annotations

import os
import sys

from earlyexit_kernels.integrations.cli_options import (
    HTTP_FIELDS,
    CliError,
    add_audit_options,
    add_base_options,
    add_engine_options,
    add_fit_options,
    add_http_options,
    audit_given,
    audit_line,
    checked_engine,
    engine_keywords,
    flagged,
    recertify_options,
    set_threads,
)
from earlyexit_kernels.integrations.extras import install_line
from earlyexit_kernels.integrations.model_folder import load_model
from earlyexit_kernels.integrations.recertify_cli import add_recertify_options

#: where a float32 model's encoder layers run (:data:`earlyexit_kernels.engine.layers.served_layers.SERVED_LAYERS`)
SERVED_LAYERS = ("auto", "onnxruntime", "openvino", "torch")

#: seconds between two trims (earlyexit_kernels.integrations.server.memory_trim.DEFAULT_INTERVAL, written
#: out: importing the server package here would make `eek --help` load starlette, test_import_time)
DEFAULT_INTERVAL = 10.0

#: eek serve's engine options (EngineConfig fields) and their defaults: ServeSettings' engine's, written out as
#: DEFAULT_INTERVAL is (python_tests/test_engine_options.py holds them equal); --max-age as its text
SERVE_ENGINE_FLAGS = ("max_batch_size", "max_tokens", "max_length", "compile", "max_age", "call_cost", "engine")
SERVE_ENGINE_DEFAULTS = {
    "max_batch_size": 64,
    "max_tokens": None,
    "max_length": None,
    "compile": False,
    "max_age": "0",
    "call_cost": None,
    "engine": "auto",
}

__all__ = ["add_serve_command", "run_serve", "memory_trim_interval"]


def add_serve_command(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve the model over HTTP (POST /predict, /classify, /rerank, ...)",
        description=(
            "Serve MODEL over HTTP. Routes: POST /predict (text-embeddings-inference's shapes), POST /classify and "
            "POST /v1/classify (Infinity's and vLLM's: {model, input}), POST /rerank and POST /v1/rerank (TEI's "
            "shape or Cohere's: query with texts or documents; one-output models), POST /v2/rerank (Cohere's v2, "
            "cohere.ClientV2), POST / (the Hugging Face Inference API's text classification), POST /feedback (the "
            "label of an audited input: the audit watches accuracy lost), GET /v1/models "
            "(OpenAI's shape), GET /models (Infinity's), GET /health, GET /info, GET /metrics "
            "(Prometheus), GET /openapi.json (the OpenAPI document), GET /docs (Swagger UI over it, offline) and "
            "GET /docs/{asset} (its files). Every answer "
            "adds exit_layer and layers_run, and carries x-request-id (the client's X-Request-Id, or a new one). "
            "Sequences of all requests in flight share the continuous early-exit engine; each request is answered "
            "when its last sequence exits. SIGTERM or Ctrl-C: stop taking requests, answer those in flight, exit."
        ),
    )
    serve.add_argument(
        "model", metavar="MODEL", help="as for classify: a patched save_pretrained folder, or a plain one with --policy"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="port (default: 8080)")
    serve.add_argument("--policy", default=None, help='exit policy, e.g. "Entropy(0.3)" (default: the saved one)')
    serve.add_argument("--backend", default=None, help="auto, torch, cpp, triton or cuda (default: the saved one)")
    add_base_options(serve)
    add_engine_options(serve, SERVE_ENGINE_DEFAULTS, SERVE_ENGINE_FLAGS)
    add_http_options(serve)
    serve.add_argument(
        "--replicas",
        type=int,
        default=None,
        metavar="N",
        help="run N replicas on Ray Serve (needs ray[serve]) instead of one process",
    )
    serve.add_argument("--address", default=None, help="--replicas: a Ray cluster (default: start one here)")
    serve.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch's CPU threads for the layer calls (default: torch's choice, one per core)",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on every route but /health (401 otherwise); default: the "
        "EEK_API_KEY environment variable, else no key",
    )
    serve.add_argument(
        "--served-model-name",
        default=None,
        metavar="NAME",
        help="the model's name in answers, /info and GET /models, and what requests' \"model\" may say (default: "
        "MODEL's folder name, never its path; a Hub id as given)",
    )
    _add_served_certificate_options(serve)
    add_audit_options(serve, "sequences", "at /metrics (eek_audit_*)")
    add_recertify_options(serve, "sequences")
    serve.add_argument(
        "--memory-trim",
        default=str(int(DEFAULT_INTERVAL)),
        metavar="SECONDS|off",
        help="return the allocator's free memory to the system every SECONDS (glibc's malloc_trim), which holds "
        "resident memory down under load (docs/serving.md); nothing is done where jemalloc, mimalloc or tcmalloc is preloaded; "
        f"off: the allocator left as it is (default: {int(DEFAULT_INTERVAL)}; each --replicas replica too)",
    )
    serve.add_argument(
        "--memory-flat",
        action="store_true",
        help="also map blocks of 128 KiB or more on their own (glibc's mmap threshold fixed), so resident memory "
        "stays flat under load, at about a quarter fewer texts/s (docs/serving.md); needs --memory-trim",
    )
    serve.add_argument(
        "--layers",
        choices=SERVED_LAYERS,  # engine.served_layers's, written here: eek --help imports no torch
        default="auto",
        help="where a float32 model's encoder layers run: auto (default), ONNX Runtime's float32 graphs where it can run "
        "them (onnxruntime installed, the model float32 on the CPU, no --compile): its memory is bounded by the largest "
        "call served (docs/serving.md); onnxruntime: those or an error; openvino: the same graphs on OpenVINO (openvino "
        "installed) or an error; torch: PyTorch's modules",
    )
    serve.add_argument("--log-level", default="info", help="uvicorn's log level (default: info)")
    serve.set_defaults(run=run_serve)


def _add_served_certificate_options(serve) -> None:
    group = serve.add_argument_group(
        "certified at start-up",
        "MODEL's threshold certified anew before the first request, on the base it is served on (--dtype), along "
        "the folder's certified path and against its budget; the folder on disk is not changed",
    )
    group.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="rows to certify on (.csv, .tsv, .jsonl, .parquet), as eek calibrate FOLDER FILE --dtype D would: "
        "unseen rows, labelled (accuracy lost against the full model on that base) or not (disagreement with it); "
        "e.g. --dtype int8 on a folder certified on float32",
    )
    # the Goal's field, said as eek calibrate says it; None: the folder's certificate's
    add_fit_options(
        group, ("guarantee",), {"guarantee": None}, {"guarantee": "--calibration: the folder's certificate's"}
    )
    group.add_argument("--text-column", default="text", help="--calibration: the texts' column (default: text)")
    group.add_argument("--pair-column", default=None, help="--calibration: the second texts' column (optional)")
    group.add_argument(
        "--label-column",
        default=None,
        help="--calibration: the labels' column (default: label, when the file has it; without labels, "
        "agreement with the full model is certified)",
    )


def run_serve(args) -> int:
    try:  # the serve extra checked before any model is loaded; _run_server uses them
        import uvicorn  # noqa: F401

        from earlyexit_kernels.integrations.server import create_app  # noqa: F401
        from earlyexit_kernels.integrations.server.serve_settings import HttpLimits
        from earlyexit_kernels.integrations.server.served_model import served_model_name
    except ImportError as error:
        raise CliError(
            f"serving needs starlette, uvicorn and prometheus_client (the serve extra): {install_line('serve')} ({error})"
        ) from None
    if args.port < 1:
        raise CliError(f"--port must be >= 1, got {args.port}")
    http = {name: getattr(args, name) for name in HTTP_FIELDS}
    try:  # each bad limit in HttpLimits' words, before the model loads
        HttpLimits(**http)
    except ValueError as error:
        raise CliError(flagged(error, http)) from None
    engine = engine_keywords(args, SERVE_ENGINE_FLAGS)
    checked_engine(engine, admission="fifo")  # each bad value in EngineConfig's words, before the model loads
    options = dict(
        **engine,
        **http,
        api_key=args.api_key if args.api_key is not None else os.environ.get("EEK_API_KEY") or None,
    )
    try:
        name = served_model_name(args.model, args.served_model_name)
    except ValueError as error:
        raise CliError(f"--served-model-name: {error}") from None
    interval = memory_trim_interval(args.memory_trim)  # a bad value fails before the model loads
    if args.memory_flat and interval == 0:
        raise CliError("--memory-flat needs the periodic trim: leave --memory-trim on (SECONDS)")
    set_threads(args.threads)
    if args.calibration is not None:
        return _serve_certified(args, options, name)
    if args.guarantee is not None:
        raise CliError("--guarantee says what --calibration certifies: give --calibration FILE too, or leave it out")
    options.update(audit_given(args), recertify=args.recertify, audit_record=args.audit_record)
    settings = _settings(args, options, model_id=name, policy=args.policy)  # the folder read once, before the model
    if args.replicas is not None:
        # each replica makes the same settings from the same folder; these are checked and said once here
        options.update(recertify_options(args, _audit_options(settings), local=False))
        return _serve_on_ray(args, options)
    _start_trim(args)  # its line before the model's; --memory-flat's threshold matters for the activations
    model, tokenizer = load_model(args.model, args.policy, args.backend, dtype=args.dtype, device=args.device)
    _serve_layers(args, model)
    # re-certification is decided on the model served (ServingState): its line said once the app is made
    says = settings.audit is not None or args.recertify is not None
    return _run_server(args, model, tokenizer, settings, say_recertify=says)


def _serve_certified(args, options: dict, name: str) -> int:
    """``eek serve --calibration FILE``: the threshold certified on FILE's rows on the served base, then served."""
    from earlyexit_kernels.integrations.served_certificate import certify_served
    from earlyexit_kernels.integrations.table_io import read_labelled
    from earlyexit_kernels.training.fit_texts import FitError

    for flag, given in (("--policy", args.policy), ("--replicas", args.replicas), ("--recertify", args.recertify)):
        if given is not None and given is not False:
            raise CliError(
                f"--calibration certifies the folder's threshold at start-up and cannot be combined with {flag}; "
                "certify a copy of the folder instead (eek calibrate COPY FILE --dtype D) and serve the copy"
            )
    model, tokenizer = load_model(
        args.model, None, args.backend, dtype=args.dtype, device=args.device, certified_here=True
    )
    _serve_layers(args, model)  # before the certificate: it is made on the layers served
    try:
        data = read_labelled(
            args.calibration,
            text_column=args.text_column,
            pair_column=args.pair_column,
            label_column=args.label_column or "label",
            label_required=args.label_column is not None,
        )
        # on another base, the risk is measured against the saved full model: loaded for the certificate alone
        reference = None
        if args.dtype not in (None, "float32"):
            reference = load_model(args.model, None, args.backend, certified_here=True)[0]
        served = certify_served(
            model,
            tokenizer,
            args.model,
            data,
            max_length=args.max_length,
            base=args.dtype,
            guarantee=args.guarantee,
            reference=reference,
        )
        del reference
    except (FitError, ValueError) as error:
        raise CliError(f"--calibration {args.calibration}: {error}") from None
    base = args.dtype or "saved"
    for line in served.lines(args.calibration, base):
        print(line, file=sys.stderr)
    options.update(audit_given(args))
    where = f"--calibration {args.calibration}"
    settings = _settings(args, options, model_id=name, certificate=served.certificate, where=where)
    return _run_server(args, model, tokenizer, settings)


def _settings(args, options: dict, **folder):
    """The server's settings from its options and MODEL's folder (``folder``: ``from_folder``'s keywords), made
    once; the audit's line said on stderr."""
    from earlyexit_kernels.integrations.server.serve_settings import ServeSettings

    try:
        settings = ServeSettings.from_folder(args.model, **folder, **options)
    except ValueError as error:
        raise CliError(str(error)) from None
    audit = settings.audit
    if audit is not None:
        print(audit_line(audit.fraction, audit.budget, audit.confidence, audit.source, "sequences"), file=sys.stderr)
    return settings


def _audit_options(settings) -> dict:
    """The audit's fraction, budget and confidence as re-certification reads them (``{}``: no audit)."""
    audit = settings.audit
    if audit is None:
        return {}
    return {"audit_fraction": audit.fraction, "audit_budget": audit.budget, "audit_confidence": audit.confidence}


def _serve_layers(args, model) -> None:
    """The model's encoder layers where ``--layers`` says (:mod:`earlyexit_kernels.engine.layers.served_layers`), in place;
    the line saying so is logged when the server starts (``args.layers_line``)."""
    from earlyexit_kernels.engine.layers.served_layers import serve_layers

    try:
        args.layers_line = serve_layers(model, args.layers, compiled=args.compile)
    except ValueError as error:
        raise CliError(str(error)) from None


def _run_server(args, model, tokenizer, settings, *, say_recertify: bool = False) -> int:
    import uvicorn

    from earlyexit_kernels.integrations.server import create_app

    try:
        app = create_app(model, tokenizer, settings)
    except ValueError as error:
        raise CliError(str(error)) from None
    if say_recertify:
        print(f"re-certification: {app.state.eek.recertify_said}", file=sys.stderr)
    print(args.layers_line, file=sys.stderr, flush=True)
    trim = _start_trim(args)
    app.state.freeze_heap = True  # this process only serves: its start-up heap is frozen once the app starts
    # uvicorn handles SIGTERM/SIGINT: it stops listening, waits for the requests in flight,
    # then the app's shutdown drains the engine.
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=None)
    finally:
        trim.stop()
    return 0


def _start_trim(args):
    """This process's memory trim (started once; it logs its line)."""
    from earlyexit_kernels.integrations.server.memory_trim import trim_once_per_process

    return trim_once_per_process(memory_trim_interval(args.memory_trim), flat=args.memory_flat)


def memory_trim_interval(value: str) -> float:
    """``--memory-trim``: seconds between two trims (``off``: 0)."""
    if value.strip().lower() == "off":
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds == float("inf"):
        raise CliError(f"--memory-trim must be a number of seconds > 0, or off; got {value!r}")
    return seconds


def _serve_on_ray(args, options: dict) -> int:
    try:
        import ray
        from ray import serve

        from earlyexit_kernels.integrations.server.ray_serve import serve_application
    except ImportError as error:
        raise CliError(f"--replicas needs Ray Serve: pip install 'ray[serve]' ({error})") from None
    if args.replicas < 1:
        raise CliError(f"--replicas must be >= 1, got {args.replicas}")
    load_model(
        args.model, args.policy, args.backend, dtype=args.dtype, device=args.device
    )  # fail here, not inside a replica
    ray.init(address=args.address)
    serve.start(http_options={"host": args.host, "port": args.port})
    app = serve_application(
        args.model,
        replicas=args.replicas,
        policy=args.policy,
        backend=args.backend,
        dtype=args.dtype,
        device=args.device,
        served_model_name=args.served_model_name,
        memory_trim=memory_trim_interval(args.memory_trim),
        memory_flat=args.memory_flat,
        **options,
    )
    print(f"serving {args.model} with {args.replicas} replicas on http://{args.host}:{args.port}", file=sys.stderr)
    serve.run(app, name="earlyexit", route_prefix="/", blocking=True)
    return 0
