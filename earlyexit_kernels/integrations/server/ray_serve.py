"""Replicas of the server on Ray Serve, for more than one process or machine.

    from earlyexit_kernels.integrations.server.ray_serve import serve_application
    app = serve_application("path/to/model", replicas=2)     # a bound Serve application
    ray.serve.run(app, route_prefix="/")                      # same endpoints as one server

Each replica loads the model once and runs the app of :func:`earlyexit_kernels.integrations.server.create_app`
(its own engine thread); Ray Serve's proxy spreads requests over the replicas. On GPUs,
give each replica one: ``ray_actor_options={"num_gpus": 1}`` (not measured here: this
project's machines have no GPU). Needs ``ray[serve]``.
"""

from __future__ import annotations

from earlyexit_kernels.integrations.server.memory_trim import DEFAULT_INTERVAL

__all__ = ["serve_application"]

#: ``app_options`` each replica resolves itself (from the folder and its model) before making its settings
RESOLVED_IN_REPLICA = ("served_model_name", "audit_record")


def serve_application(
    model_dir: str,
    *,
    replicas: int = 1,
    policy: str | None = None,
    backend: str | None = None,
    dtype: str | None = None,
    device: str = "auto",
    ray_actor_options: dict | None = None,
    memory_trim: float = DEFAULT_INTERVAL,
    memory_flat: bool = False,
    layers: str = "auto",
    **app_options,
):
    """A Ray Serve application of ``replicas`` copies of the server for the model in ``model_dir``.

    ``policy``, ``backend``: as on the command line (``"Entropy(0.3)"``; default the saved
    ones); ``dtype``, ``device``: the base each replica runs on, resolved in the replica (``"auto"``:
    the GPU Ray gave it, e.g. with ``ray_actor_options={"num_gpus": 1}``). ``app_options`` go to
    :func:`earlyexit_kernels.integrations.server.create_app` (``max_batch_size``, ``max_tokens``,
    ``max_queue``, ``max_length``, ``compile``, ``max_age``, ``audit_fraction``, ...; a bad one, or one
    that is no setting, raises here, before any replica starts). With ``audit_fraction`` and no ``audit_budget`` (or
    ``audit_confidence``), each replica takes them from the certificate of ``model_dir/eek_fit.json``
    where there is one; each replica audits and exports its own counts. ``recertify`` (None: on where
    an audit runs on a folder whose certificate bounds disagreement; True; False): each replica
    re-certifies its threshold on its own audited sequences
    (:mod:`earlyexit_kernels.calibration.online`): the router spreads the traffic over them, so
    each audit is a uniform sample of what its replica serves, and each replica's moves hold for it
    alone. ``audit_record`` with one replica only (one writer per file). ``memory_trim``: each
    replica returns its allocator's free memory every that many seconds, as ``eek serve`` does
    (:mod:`earlyexit_kernels.integrations.server.memory_trim`; 0: off); ``memory_flat``: as
    ``eek serve --memory-flat``. ``layers``: where a float32 model's encoder layers run, as ``eek serve
    --layers`` (:mod:`earlyexit_kernels.engine.layers.served_layers`; ``"auto"``: ONNX Runtime's graphs where it can).
    """
    try:
        from ray import serve
    except ImportError as error:
        raise ImportError(f"serving on Ray needs Ray Serve: pip install 'ray[serve]' ({error})") from None
    if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
        raise ValueError(f"replicas must be an integer >= 1, got {replicas!r}")
    if replicas > 1 and app_options.get("audit_record") is not None:
        raise ValueError("audit_record is one file, written by one replica: serve one replica, or leave it out")
    if isinstance(memory_trim, bool) or not isinstance(memory_trim, int | float) or not 0 <= memory_trim < float("inf"):
        raise ValueError(f"memory_trim must be a number of seconds >= 0 (0: off), got {memory_trim!r}")
    if memory_flat and memory_trim == 0:
        raise ValueError("memory_flat needs the periodic trim: give memory_trim in seconds")
    from earlyexit_kernels.engine.layers.served_layers import SERVED_LAYERS

    if layers not in SERVED_LAYERS:
        raise ValueError(f"layers must be one of {', '.join(SERVED_LAYERS)}; got {layers!r}")
    from earlyexit_kernels.integrations.server.serve_settings import ServeSettings, recertify_on_own_threshold

    recertify_on_own_threshold(app_options.get("recertify"), own_threshold=policy is not None)  # each replica's rule

    # every server setting checked here, before any replica starts; each replica then makes its own from the
    # folder (the audit's budget, the certificate, the served name; the record, which needs it)
    ServeSettings.from_options(
        **{name: value for name, value in app_options.items() if name not in RESOLVED_IN_REPLICA}
    )

    def build_app():
        from earlyexit_kernels.engine.layers.served_layers import serve_layers
        from earlyexit_kernels.integrations.model_folder import load_model
        from earlyexit_kernels.integrations.server.app import create_app
        from earlyexit_kernels.integrations.server.memory_trim import trim_once_per_process
        from earlyexit_kernels.integrations.server.served_model import served_model_name

        trim_once_per_process(memory_trim, flat=memory_flat)  # the replica's process, as eek serve's
        model, tokenizer = load_model(model_dir, policy, backend, dtype=dtype, device=device)
        print(serve_layers(model, layers, compiled=bool(app_options.get("compile"))), flush=True)
        options = dict(app_options)
        name = served_model_name(model_dir, options.pop("served_model_name", None))
        # the replica's own re-certification, on its own audited sequences (ServingState decides it)
        settings = ServeSettings.from_folder(model_dir, policy=policy, model_id=name, **options)
        app = create_app(model, tokenizer, settings)
        app.state.freeze_heap = True  # the replica's process only serves, as eek serve's
        return app

    ingress = serve.ingress(build_app)(type("EarlyExitServer", (), {}))
    deployment = serve.deployment(
        ingress, name="EarlyExitServer", num_replicas=replicas, ray_actor_options=ray_actor_options or {"num_cpus": 1}
    )
    return deployment.bind()
