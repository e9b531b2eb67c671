"""`kvlm serve` (the embedded TF-Serving-compatible server) and `kvlm predict` (its client)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _flag(value: str) -> bool:
    """`--enable_batching`, `--enable_batching=true` and `--enable_batching=false` as in TF Serving."""
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def register(subparsers) -> None:
    """Adds the `serve` and `predict` commands."""
    serve = subparsers.add_parser(
        "serve",
        help="serve SavedModels over TF Serving's gRPC and REST APIs",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    serve.add_argument("--port", type=int, default=8500, help="gRPC port (0: any free port)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)")
    serve.add_argument("--rest_api_port", type=int, default=None,
                       help="REST API port, e.g. 8501 (0: any free port; default: no REST API)")
    serve.add_argument("--rest_api_host", default=None, help="address the REST API binds (default: --host)")
    serve.add_argument("--rest_api_timeout_in_ms", type=int, default=30000, help="time a REST call may take")
    serve.add_argument("--monitoring_config_file", default=None,
                       help="MonitoringConfig text proto: prometheus_config { enable: true, path: ... }")
    serve.add_argument("--max_image_pixels", type=int, default=None,
                       help="refuse images above this many pixels, read from their headers (0: no limit; "
                            "default 4096x4096)")
    serve.add_argument("--max_decode_bytes", type=int, default=None,
                       help="memory all requests' images may take decoded at once (0: no limit; default 1 GiB)")
    serve.add_argument("--model_name", default="default", help="name of the model given by --model_base_path")
    serve.add_argument("--model_base_path", default=None, help="folder holding the model's numeric versions")
    serve.add_argument("--model_config_file", default=None, help="models.config (ModelServerConfig text proto)")
    serve.add_argument("--enable_batching", type=_flag, nargs="?", const=True, default=False)
    serve.add_argument("--batching_parameters_file", default=None, help="BatchingParameters text proto")
    serve.add_argument("--file_system_poll_wait_seconds", type=float, default=1.0,
                       help="seconds between polls for new versions (0: load once at start)")
    serve.add_argument("--ssl_config_file", default=None, help="SSLConfig text proto (server_key, server_cert, ...)")
    serve.add_argument("--ssl_cert_file", default=None, help="PEM certificate (with --ssl_key_file)")
    serve.add_argument("--ssl_key_file", default=None, help="PEM private key (with --ssl_cert_file)")
    serve.add_argument("--ssl_ca_file", default=None, help="PEM CA: require client certificates signed by it")
    serve.add_argument("--auth_token", default=None,
                       help="require 'authorization: Bearer TOKEN' (default: $KVLM_AUTH_TOKEN if set)")
    serve.add_argument("--max_message_bytes", type=int, default=32 * 1024 * 1024,
                       help="largest request/response; larger ones get RESOURCE_EXHAUSTED")
    serve.add_argument("--grpc_max_threads", type=int, default=64, help="threads handling calls")
    serve.add_argument("--tensorflow_intra_op_parallelism", type=int, default=0, help="0: TensorFlow's default")
    serve.add_argument("--tensorflow_inter_op_parallelism", type=int, default=0, help="0: TensorFlow's default")
    serve.add_argument("--tensorflow_thread_spinning", action=argparse.BooleanOptionalAction, default=False,
                       help="let TensorFlow's idle threads spin for work (off: they leave the CPU to the threads "
                            "that answer requests)")
    serve.add_argument("--shutdown_grace_seconds", type=float, default=10.0,
                       help="time in-flight calls get to finish on SIGTERM/SIGINT")
    serve.set_defaults(handler=run_serve)

    predict = subparsers.add_parser(
        "predict",
        help="ask a served model a question about an image (gRPC Predict)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    predict.add_argument("--server", default="localhost:8500", help="HOST:PORT of the gRPC server")
    predict.add_argument("--image", help="image file (PNG, JPEG, GIF or BMP)")
    predict.add_argument("--text", help="the question")
    predict.add_argument("--data", help="instead of --image/--text: a folder with annotations.jsonl to ask from")
    predict.add_argument("--limit", type=int, default=5, help="with --data: how many examples to ask")
    predict.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the model to be AVAILABLE")
    predict.add_argument("--model_name", default="kvlm")
    predict.add_argument("--model_version", type=int, default=None, help="default: the latest")
    predict.add_argument("--signature_name", default="serving_default")
    predict.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    predict.add_argument("--auth_token", default=None, help="bearer token (default: $KVLM_AUTH_TOKEN)")
    predict.add_argument("--ssl_ca_file", default=None, help="PEM CA to connect with TLS")
    predict.add_argument("--top", type=int, default=3, help="how many answers to show")
    predict.add_argument("--json", action="store_true", help="print the outputs as JSON")
    predict.set_defaults(handler=run_predict)


def server_options(args):
    """`ServerOptions` from parsed `kvlm serve` flags."""
    from kvlm.serving.config import (
        ModelConfig,
        ServerOptions,
        auth_token_from_env,
        load_batching_parameters,
        load_model_config,
        load_monitoring_config,
        load_ssl_config,
        tls_from_files,
    )

    if bool(args.model_base_path) == bool(args.model_config_file):
        raise ValueError("Give exactly one of --model_base_path (with --model_name) or --model_config_file.")
    if args.model_config_file:
        models = load_model_config(args.model_config_file)
    else:
        models = [ModelConfig(args.model_name, Path(args.model_base_path).resolve())]
    batching = None
    if args.enable_batching:
        from kvlm.serving.config import BatchingConfig

        batching = load_batching_parameters(args.batching_parameters_file) if args.batching_parameters_file else BatchingConfig()
    elif args.batching_parameters_file:
        raise ValueError("--batching_parameters_file needs --enable_batching.")
    tls = None
    if args.ssl_config_file:
        tls = load_ssl_config(args.ssl_config_file)
    elif args.ssl_cert_file or args.ssl_key_file:
        if not (args.ssl_cert_file and args.ssl_key_file):
            raise ValueError("TLS needs both --ssl_cert_file and --ssl_key_file.")
        tls = tls_from_files(args.ssl_cert_file, args.ssl_key_file, args.ssl_ca_file)
    prometheus_path = load_monitoring_config(args.monitoring_config_file) if args.monitoring_config_file else None
    limits = {name: value for name in ("max_image_pixels", "max_decode_bytes")
              if (value := getattr(args, name)) is not None}
    return ServerOptions(
        models=models, host=args.host, port=args.port, batching=batching,
        rest_api_port=args.rest_api_port, rest_api_host=args.rest_api_host,
        rest_api_timeout_seconds=args.rest_api_timeout_in_ms / 1000, prometheus_path=prometheus_path, **limits,
        file_system_poll_wait_seconds=args.file_system_poll_wait_seconds, tls=tls,
        auth_token=auth_token_from_env(args.auth_token), max_message_bytes=args.max_message_bytes,
        grpc_max_threads=args.grpc_max_threads, shutdown_grace_seconds=args.shutdown_grace_seconds,
    )


def run_serve(args) -> int:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = server_options(args)
    from kvlm.serving.server import configure_tensorflow, serve

    configure_tensorflow(args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism,
                         args.tensorflow_thread_spinning)
    return serve(options)


def run_predict(args) -> int:
    import grpc

    from kvlm.serving.client import PredictClient

    if args.data:
        if args.image or args.text:
            raise ValueError("Give either --data or --image with --text, not both.")
        from kvlm.data import load_folder

        examples = load_folder(args.data)[: max(args.limit, 1)]
        images = [Path(e.image_path).read_bytes() for e in examples]
        texts = [e.question for e in examples]
    else:
        if not (args.image and args.text):
            raise ValueError("Give --image and --text (or --data).")
        image = Path(args.image)
        if not image.is_file():
            raise FileNotFoundError(f"No image file at {image}")
        examples, images, texts = None, [image.read_bytes()], [args.text]
    ca = Path(args.ssl_ca_file).read_bytes() if args.ssl_ca_file else None
    token = args.auth_token or os.environ.get("KVLM_AUTH_TOKEN")
    with PredictClient(args.server, timeout=args.timeout, auth_token=token, root_certificates=ca) as client:
        try:
            if args.wait > 0:
                client.wait_until_available(args.model_name, args.wait)
            outputs = client.ask(args.model_name, images, texts, args.signature_name, args.model_version)
        except (grpc.RpcError, TimeoutError) as error:
            detail = f"{error.code().name}: {error.details()}" if isinstance(error, grpc.RpcError) else str(error)
            print(f"kvlm predict: {detail}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps([{k: _jsonable(v[i]) for k, v in outputs.items()} for i in range(len(texts))]
                         if examples else {k: _jsonable(v[0]) for k, v in outputs.items()}))
        return 0
    if examples:
        correct = 0
        for i, example in enumerate(examples):
            answer = _jsonable(outputs["answer"][i])
            correct += answer == example.answer
            mark = "ok" if answer == example.answer else f"expected {example.answer}"
            expert = f", expert {_jsonable(outputs['expert'][i])}" if "expert" in outputs else ""
            print(f"{Path(example.image_path).name}  {example.question!r} -> {answer} "
                  f"({float(outputs['score'][i]):.3f}{expert}) [{mark}]")
        print(f"{correct}/{len(examples)} answered as annotated")
        return 0
    if "scores" in outputs and "labels" in outputs:
        ranked = sorted(zip(outputs["scores"][0], outputs["labels"][0]), key=lambda pair: -pair[0])
        for score, label in ranked[: max(args.top, 1)]:
            print(f"{label.decode()}\t{score:.4f}")
    else:
        for name, value in outputs.items():
            print(f"{name}: {_jsonable(value[0])}")
    return 0


def _jsonable(value):
    import numpy as np

    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    value = np.asarray(value)
    if value.dtype == object:
        return [v.decode("utf-8", "replace") for v in value.ravel()] if value.ndim else value.item().decode("utf-8", "replace")
    return value.tolist()
