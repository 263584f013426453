"""``robustdeq archive | serve | stop | predict``: ``add_<command>_arguments`` and ``run_<command>``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .archive import DEFAULT_HANDLER, DEFAULT_STORE, LANE_DEFAULTS, LANES
from .options import DEFENSE_MODES
from .runfolder import DEFAULT_RUN_DIR
from .server import DEFAULT_MODELS, LOOPBACK, Ports


def add_archive_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Wrap a checkpoint into two TorchServe archives, NAME.mar (plain lane: defense off, large "
        "batches) and NAME-defended.mar (defended lane: Algorithm 1 on or gated, small batches, long timeout). "
        "Each holds the checkpoint, the handler, model-config.yaml, the robustness card and the label names. "
        "The same inputs always give the same bytes."
    )
    p.add_argument("--checkpoint", help="a model.pt written by 'robustdeq train'")
    p.add_argument("--name", help="model name for the endpoints (/predictions/NAME)")
    p.add_argument(
        "--shipped",
        action="store_true",
        help="rebuild the shipped archives (archive.SHIPPED: deq-small, lyadeq-small, deq-tiny, lyadeq-tiny) "
        "from training/shipped/ (what 'make archives' runs)",
    )
    p.add_argument("--out", default=str(DEFAULT_STORE), help="model store folder (default: model_store/)")
    p.add_argument("--card", default=None, help="robustness_card.json (default: the one beside the checkpoint, if any)")
    p.add_argument("--lanes", default=",".join(LANES), help="which archives to build (default: plain,defended)")
    p.add_argument("--handler", default=str(DEFAULT_HANDLER), help="handler file (default: handlers/)")
    p.add_argument(
        "--no-onnx",
        action="store_true",
        help="answer the plain lane with PyTorch instead of the exported ONNX graph (default: ONNX Runtime when "
        "the model exports; it measured 3-7x faster than eager PyTorch for deq-tiny on this CPU)",
    )
    for lane in LANES:
        d = LANE_DEFAULTS[lane]
        p.add_argument(
            f"--{lane}-lane",
            default=None,
            metavar="B,D,T",
            help=f"TorchServe batching of the {lane} lane: batch size, max batch delay (ms), response timeout (s), "
            f"optionally workers (default {d.batch_size},{d.max_batch_delay_ms},{d.response_timeout_s},{d.workers})",
        )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="handler default or bound, e.g. --set R=5 --set max_R=20 (see docs: T_f, R, beta, eps, top_k, max_R, "
        "max_eps, max_beta, max_image_side, max_image_pixels, torch_threads, cpu_nice)",
    )


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Start TorchServe with the hardened serving/config.properties (loopback only, token auth on, "
        "model registration API off), load each model's plain and -defended archives, wait until every worker "
        "is ready, and print the endpoints, where the token is, and a curl to paste. 'robustdeq stop' stops it."
    )
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="models to load (default: %(default)s)")
    p.add_argument("--store", default=str(DEFAULT_STORE), help="model store (default: model_store/)")
    p.add_argument(
        "--run-dir",
        default=str(DEFAULT_RUN_DIR),
        help="run folder: config, tokens, logs (default: $ROBUSTDEQ_RUN_DIR or .serve)",
    )
    ports = Ports()
    for name in ("inference", "management", "metrics"):
        default = getattr(ports, name)
        p.add_argument(f"--{name}-port", type=int, default=default, help=f"{name} port (default {default})")
    p.add_argument(
        "--grpc-ports",
        type=int,
        nargs=2,
        default=(ports.grpc_inference, ports.grpc_management),
        metavar=("INFER", "MANAGE"),
        help="TorchServe's gRPC inference and management ports (default 7070 7071); the kserve runtime serves OIP "
        "v2 gRPC on INFER",
    )
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the workers (default 300)")
    p.add_argument(
        "--foreground",
        action="store_true",
        help="stay attached and stream TorchServe's console to stdout until Ctrl-C or SIGTERM (containers)",
    )
    p.add_argument(
        "--bind",
        default=LOOPBACK,
        metavar="HOST",
        help="address of the inference and metrics listeners (default 127.0.0.1; 0.0.0.0 only inside a container "
        "whose ports you publish). The management API always stays on 127.0.0.1",
    )
    p.add_argument(
        "--runtime",
        choices=("torchserve", "kserve"),
        default="torchserve",
        help="torchserve (default, what 'make serve' starts) or kserve: KServe's Python ModelServer, OIP v2 REST and "
        "KServe v1 on --inference-port, OIP v2 gRPC on the first --grpc-ports, in the foreground, from its own "
        "environment (docs/serving.md)",
    )
    p.add_argument(
        "--gpus",
        type=int,
        default=None,
        metavar="N",
        help="TorchServe's number_of_gpu: workers are spread over N GPUs (default: every visible GPU; 0: CPU only)",
    )


def add_stop_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))


def add_predict_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Send image files to a running server and print the prediction, the entropy along the "
        "dynamics, what the defense did and what the robustness card says about the setting. The address and "
        "token come from the run folder (or ROBUSTDEQ_URL / ROBUSTDEQ_TOKEN)."
    )
    p.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...; any size)")
    p.add_argument(
        "--model",
        default=None,
        help=f"model name (default: the first model the server in --run-dir loaded, else {DEFAULT_MODELS[0]})",
    )
    p.add_argument("--defense", choices=DEFENSE_MODES, default="off")
    p.add_argument("--T_f", type=int, default=None)
    p.add_argument("--R", type=int, default=None)
    p.add_argument("--beta", default=None, help="e.g. 2/255")
    p.add_argument("--eps", default=None, help="e.g. 8/255")
    p.add_argument("--state", type=int, default=None, help="early state to read (default: the checkpoint's)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR))
    p.add_argument("--json", action="store_true", help="print the raw JSON answers")


def run_archive(args: argparse.Namespace) -> int:
    from .archive import build_archives, build_shipped, parse_lane_config

    defaults = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        defaults[key.strip()] = value.strip()
    lanes = tuple(x.strip() for x in args.lanes.split(",") if x.strip())
    if not args.shipped and not (args.checkpoint and args.name):
        raise ValueError("give --checkpoint and --name, or --shipped")
    lane_configs = {}
    for lane in LANES:
        text = getattr(args, f"{lane}_lane")
        if text:
            lane_configs[lane] = parse_lane_config(text, lane)
    common = dict(lanes=lanes, handler=Path(args.handler), lane_configs=lane_configs, defaults=defaults,
                  onnx=not args.no_onnx)  # fmt: skip
    if args.shipped:
        built = build_shipped(Path(args.out), **common)
    else:
        card = Path(args.card) if args.card else None
        built = build_archives(Path(args.checkpoint), args.name, Path(args.out), card, **common)
    for path in built:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from .server import ServerError, sigterm_as_interrupt, start_server

    if getattr(args, "runtime", "torchserve") == "kserve":
        from .kserve_runtime import exec_kserve

        return exec_kserve(args)
    if args.foreground:
        sigterm_as_interrupt()
    ports = Ports(args.inference_port, args.management_port, args.metrics_port, *args.grpc_ports)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        info = start_server(
            Path(args.run_dir),
            models,
            Path(args.store),
            ports,
            timeout=args.timeout,
            host=args.bind,
            console_to_stdout=args.foreground,
            gpus=args.gpus,
        )
    except ServerError as exc:
        print(f"robustdeq serve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("robustdeq serve: interrupted while starting; TorchServe stopped", file=sys.stderr)
        return 130
    key_file = info.key_file
    token_cmd = f"python3 -c \"import json;print(json.load(open('{key_file}'))['inference']['key'])\""
    print(f"\nTorchServe is up (pid {info.pid}), run folder {info.run_dir}", flush=True)
    print(f"  inference   {info.inference_url}/predictions/<model>   models: {', '.join(info.models)}")
    print(f"  management  {info.management_url}   (management key; model registration is off)")
    print(f"  metrics     {info.metrics_url}/metrics   (Prometheus text)")
    print(f"  tokens      {key_file}  (inference / management keys; they expire, see docs/serving.md)")
    example = Path(__file__).resolve().parents[2] / "serving" / "examples" / "cat.png"
    image = example if example.is_file() else Path("IMAGE.png")
    print("\nTry it:")
    print(f"  TOKEN=$({token_cmd})")
    print(
        f'  curl -s {info.inference_url}/predictions/{models[0]} -H "Authorization: Bearer $TOKEN" '
        f'-H "Content-Type: image/png" --data-binary @{image}'
    )
    print(
        f'  curl -s {info.inference_url}/predictions/{models[0]}-defended -H "Authorization: Bearer $TOKEN" '
        f'-H "Content-Type: image/png" -H "X-T-f: 2" -H "X-R: 10" --data-binary @{image}'
    )
    script = Path(sys.executable).parent / "robustdeq"
    print(f"  {script if script.is_file() else 'robustdeq'} predict {image} --defense on     # the Python client")
    print("Stop it with: robustdeq stop   (or make stop)")
    if args.foreground:
        from .server import wait_until_stopped

        return wait_until_stopped(info)
    return 0


def run_stop(args: argparse.Namespace) -> int:
    from .server import stop_server

    stop_server(Path(args.run_dir))
    return 0


def _served_model(run_dir: Path) -> str:
    """The first model (plain registration) of the server in ``run_dir``, else the default one."""
    from .archive import DEFENDED_SUFFIX
    from .runfolder import read_server_info

    info = read_server_info(run_dir)
    plain = [m for m in (info.models if info else []) if not m.endswith(DEFENDED_SUFFIX)]
    return plain[0] if plain else DEFAULT_MODELS[0]


def run_predict(args: argparse.Namespace) -> int:
    from .client import Client, summarise
    from .runfolder import ServerError

    try:
        client = Client.from_run_dir(Path(args.run_dir))
    except ServerError as exc:
        print(f"robustdeq predict: error: {exc}", file=sys.stderr)
        return 1
    options = dict(defense=args.defense, T_f=args.T_f, R=args.R, beta=args.beta, eps=args.eps, state=args.state)
    options["top_k"] = args.top_k
    model = args.model or _served_model(Path(args.run_dir))
    worst = 0
    for image in args.images:
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        status, answer = client.predict_file(model, path, **options)
        worst = max(worst, 0 if status == 200 else 1)
        print(json.dumps(answer, indent=1) if args.json else summarise(str(path), status, answer))
    return worst
