"""Serving benchmark: the embedded server over gRPC and REST, with and without batching.

Measures, in one run on one machine:
  * throughput and client-side p50/p99 latency of N concurrent clients x M requests
    (one example per request) against `kvlm serve` with and without `--enable_batching`,
    over gRPC and, on the batched server, over TF Serving's REST API (`{"b64": ...}` images)
    and the Open Inference Protocol's REST (binary tensor data) and gRPC (raw contents)
    `infer`; the same with the server's thread pools tuned for concurrent requests
    (`--tuned-flags`); every scenario once per round, over several rounds;
  * p50 latency of single requests from one client (no batching) against a direct
    in-process call of the same SavedModel signature on the same inputs;
  * in every round, the fixed cost of a request (server and client CPU per request) on a signature that
    costs almost nothing (`y = 0.5 * x + 2`), and the throughput ratio that cost leaves
    batching on this machine.

Targets: batched throughput >= 3.5x unbatched at 32 clients; server p50 at batch 1
<= 1.10x the direct call. Every request must succeed.

Usage:
    python bench/serving.py                      # tiny random-weight model
    python bench/serving.py --run runs/vqa       # a trained run
Writes bench/results/serving.json and serving.md.
"""

from __future__ import annotations

import argparse
import base64
import functools
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import common

common.use_tensorflow(__file__)

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tensorflow_text  # noqa: E402,F401
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc  # noqa: E402

# Batched over unbatched throughput at 32 clients, and the server's batch-1 p50 over a direct call's.
THROUGHPUT_TARGET = 3.5
LATENCY_TARGET = 1.10

BATCHING = """max_batch_size {{ value: {max_batch_size} }}
batch_timeout_micros {{ value: {timeout} }}
max_enqueued_batches {{ value: 100 }}
num_batch_threads {{ value: {threads} }}
"""


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


class ServerProcess:
    """`kvlm serve` in a subprocess on a free port."""

    def __init__(self, base_path: Path, extra: list[str]):
        command = [
            sys.executable, "-m", "kvlm", "serve", "--port", "0", "--model_name", "kvlm",
            "--model_base_path", str(base_path), "--file_system_poll_wait_seconds", "0", *extra,
        ]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=common.ROOT)
        line = self.process.stdout.readline()
        if "Running gRPC ModelServer at" not in line:
            self.process.kill()
            raise RuntimeError(f"server did not start: {line!r}")
        self.target = line.strip().rsplit(" ", 1)[-1]
        self.rest_target = None
        if "--rest_api_port" in extra:
            line = self.process.stdout.readline()
            if "Exporting HTTP/REST API at" not in line:
                self.process.kill()
                raise RuntimeError(f"REST API did not start: {line!r}")
            self.rest_target = line.strip().rsplit(" ", 1)[-1]

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def measured_load(server: ServerProcess, requests: list, clients: int, per_client: int, api: str = "grpc") -> dict:
    """The load of `api` (`LOADS`: its function and whether it takes the REST port) plus the
    server's and the clients' CPU time per request."""
    run, rest = LOADS[api]
    start, client_start = server.cpu_seconds(), time.process_time()
    result = run(server.rest_target if rest else server.target, requests, clients, per_client)
    result["server_cpu_ms_per_request"] = (server.cpu_seconds() - start) * 1e3 / result["requests"]
    result["client_cpu_ms_per_request"] = (time.process_time() - client_start) * 1e3 / result["requests"]
    return result


class RequestFailed(Exception):
    """A request that got an error status."""


def drive(clients: int, per_client: int, connect) -> dict:
    """Runs `clients` threads, each sending `per_client` requests in a row.

    `connect(index)` opens one client's connection and returns `(call, close)`; `call()`
    sends one request and returns the size of the batch it ran in (0: not reported), or
    raises `RequestFailed`. Each client sends one request before the clock starts.
    """
    latencies: list[list[float]] = [[] for _ in range(clients)]
    batch_sizes: list[list[int]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(index: int) -> None:
        call, close = connect(index)
        call()  # connect before the clock starts
        barrier.wait()
        for _ in range(per_client):
            start = time.perf_counter()
            try:
                size = call()
            except RequestFailed as error:
                errors.append(str(error))
                continue
            latencies[index].append(time.perf_counter() - start)
            batch_sizes[index].append(size)
        close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    flat = [x for part in latencies for x in part]
    sizes = [x for part in batch_sizes for x in part if x]
    return {
        "clients": clients,
        "requests": clients * per_client,
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:5],
        "seconds": seconds,
        "throughput_rps": len(flat) / seconds,
        "p50_ms": percentile(flat, 50) * 1e3,
        "p99_ms": percentile(flat, 99) * 1e3,
        "mean_batch_size_seen": float(np.mean(sizes)) if sizes else float("nan"),
        "max_batch_size_seen": max(sizes, default=0),
    }


def load(target: str, requests: list, clients: int, per_client: int, timeout: float = 60.0) -> dict:
    """gRPC clients, each with its own channel, sending one Predict request after another."""

    def connect(index: int):
        channel = grpc.insecure_channel(target)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = requests[index % len(requests)]

        def call() -> int:
            try:
                _, rpc = stub.Predict.with_call(request, timeout=timeout)
            except grpc.RpcError as error:
                raise RequestFailed(f"{error.code().name}: {error.details()}") from None
            return int(dict(rpc.trailing_metadata() or ()).get("kvlm-batch-size", 1))

        return call, channel.close

    return drive(clients, per_client, connect)


def http_load(path: str, target: str, payloads: list[tuple[dict, bytes]], clients: int, per_client: int,
              timeout: float = 60.0) -> dict:
    """REST clients, each with its own keep-alive HTTP connection, POSTing `(headers, body)`
    payloads to `path`."""
    host, port = target.rsplit(":", 1)

    def connect(index: int):
        connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
        headers, body = payloads[index % len(payloads)]

        def call() -> int:
            connection.request("POST", path, body, headers)
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RequestFailed(f"HTTP {response.status}")
            return 0

        return call, connection.close

    return drive(clients, per_client, connect)


def rest_bodies(images: list[bytes], texts: list[str]) -> list[tuple[dict, bytes]]:
    """Row-format `:predict` payloads, one example each, images as `{"b64": ...}`."""
    headers = {"Content-Type": "application/json"}
    return [
        (headers, json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(i).decode()}, "text": t}]}).encode())
        for i, t in zip(images, texts)
    ]


def v2_grpc_load(target: str, requests: list, clients: int, per_client: int, timeout: float = 60.0) -> dict:
    """Open Inference Protocol gRPC clients, each with its own channel, calling ModelInfer with
    raw contents (`v2_grpc_requests`) through a plain unary stub."""
    from kvlm.serving.open_inference_protos import SERVICE, message_class

    response_type = message_class("ModelInferResponse")

    def connect(index: int):
        channel = grpc.insecure_channel(target)
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=response_type.FromString)
        request = requests[index % len(requests)]

        def call() -> int:
            try:
                infer(request, timeout=timeout)
            except grpc.RpcError as error:
                raise RequestFailed(f"{error.code().name}: {error.details()}") from None
            return 0

        return call, channel.close

    return drive(clients, per_client, connect)


def _bytes_element(value: bytes) -> bytes:
    return len(value).to_bytes(4, "little") + value


def v2_rest_bodies(images: list[bytes], texts: list[str]) -> list[tuple[dict, bytes]]:
    """Open Inference Protocol infer payloads, one example each, under the binary tensor data
    extension: both inputs as binary BYTES, outputs asked in binary."""
    payloads = []
    for image, text in zip(images, texts):
        raw = [_bytes_element(image), _bytes_element(text.encode())]
        header = json.dumps({"inputs": [
            {"name": name, "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": len(r)}}
            for name, r in zip(("image_bytes", "text"), raw)
        ], "parameters": {"binary_data_output": True}}).encode()
        headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}
        payloads.append((headers, header + b"".join(raw)))
    return payloads


def v2_grpc_requests(images: list[bytes], texts: list[str]) -> list:
    """One-example ModelInfer requests with raw input contents."""
    from kvlm.serving.open_inference_protos import message_class

    requests = []
    for image, text in zip(images, texts):
        request = message_class("ModelInferRequest")(model_name="kvlm")
        for name in ("image_bytes", "text"):
            request.inputs.add(name=name, datatype="BYTES", shape=[1])
        request.raw_input_contents.extend([_bytes_element(image), _bytes_element(text.encode())])
        requests.append(request)
    return requests


# Each API's load: its function, and whether it goes to the REST port.
LOADS = {"grpc": (load, False), "rest": (functools.partial(http_load, "/v1/models/kvlm:predict"), True),
         "v2_rest": (functools.partial(http_load, "/v2/models/kvlm/infer"), True), "v2_grpc": (v2_grpc_load, False)}


def batch1_latencies(version_dir: Path, target: str, request, image: bytes, text: str, calls: int):
    """Latencies of single requests: a direct in-process call of the SavedModel's
    serving_default, and the same input through the server, alternating call by call
    so that both see the same machine load. Returns `(direct, served)` in seconds."""
    model = tf.saved_model.load(str(version_dir))
    function = model.signatures["serving_default"]
    channel = grpc.insecure_channel(target)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)

    def direct_call():
        outputs = function(image_bytes=tf.constant([image]), text=tf.constant([text]))
        return {k: v.numpy() for k, v in outputs.items()}

    direct, served = [], []
    for i in range(calls + 10):
        start = time.perf_counter()
        direct_call()
        middle = time.perf_counter()
        stub.Predict(request, timeout=30)
        end = time.perf_counter()
        if i >= 10:  # warm-up
            direct.append(middle - start)
            served.append(end - middle)
    channel.close()
    return direct, served


class _Affine(tf.Module):
    """A signature that costs almost nothing: what a request costs besides its model."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def serve(self, x):
        return {"y": 0.5 * x + 2.0}


def write_affine(workdir: Path) -> tuple[Path, predict_pb2.PredictRequest]:
    """`_Affine` as model "kvlm" version 1 under `workdir/affine`; returns that base path and a request."""
    module = _Affine()
    tf.saved_model.save(module, str(workdir / "affine" / "1"), signatures={"serving_default": module.serve})
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "kvlm"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([2.0], shape=[1]))
    return workdir / "affine", request


def batching_ceiling(unbatched: dict, batched: dict, fixed: dict) -> dict:
    """The throughput ratio batching can reach when the machine's cores are shared by server and
    clients: each request costs the fixed server and client CPU, plus its signature's CPU
    (the model's server CPU per request less the fixed server part). `signature_ratio` is the
    ratio if requests cost nothing but their signature."""
    fixed_ms = {k: fixed[k]["server_cpu_ms_per_request"] + fixed[k]["client_cpu_ms_per_request"] for k in fixed}
    signature_ms = {
        "unbatched": unbatched["server_cpu_ms_per_request"] - fixed["unbatched"]["server_cpu_ms_per_request"],
        "batched": batched["server_cpu_ms_per_request"] - fixed["batched"]["server_cpu_ms_per_request"],
    }
    total = {k: signature_ms[k] + fixed_ms[k] for k in fixed_ms}
    return {
        "fixed_cpu_ms_per_request": fixed_ms,
        "signature_cpu_ms_per_request": signature_ms,
        "ratio": total["unbatched"] / total["batched"],
        "signature_ratio": signature_ms["unbatched"] / signature_ms["batched"],
    }


def prepare(run: str | None, workdir: Path) -> Path:
    """Exports `run` (or a tiny random-weight run) to `workdir/saved_models/kvlm/1`."""
    from kvlm.export import export_model
    from kvlm.export.testing import make_tiny_run

    run_dir = Path(run) if run else make_tiny_run(workdir / "run")
    return export_model(run_dir, base_path=workdir / "saved_models", name="kvlm")


@dataclass
class Scenario:
    """A server (`base_path` served with `flags`) and its gRPC requests; with `more` (`{api:
    payloads}` of `LOADS`), the same server then takes those loads too, one after another."""

    base_path: Path
    flags: list[str]
    requests: list
    more: dict[str, list] | None = None


def run_rounds(scenarios: dict[str, Scenario], args, on_start=None) -> dict[str, list[dict]]:
    """Runs every scenario once per round, in the same order, so that the scenarios of a round
    share the machine's state (its speed drifts by tens of percent between minutes).

    Returns each name's list of `measured_load` results, one per round; the loads of `more` are
    listed under `<name>_<api>`. `on_start(name, server)` runs on the first round's servers before
    their load.
    """
    runs: dict[str, list[dict]] = {}
    for round_index in range(args.rounds):
        for name, scenario in scenarios.items():
            more = scenario.more or {}
            rest = any(LOADS[api][1] for api in more)
            server = ServerProcess(scenario.base_path, scenario.flags + (["--rest_api_port", "0"] if rest else []))
            try:
                if round_index == 0 and on_start is not None:
                    on_start(name, server)
                runs.setdefault(name, []).append(measured_load(server, scenario.requests, args.clients, args.requests))
                for api, payloads in more.items():
                    runs.setdefault(f"{name}_{api}", []).append(
                        measured_load(server, payloads, args.clients, args.requests, api)
                    )
            finally:
                server.stop()
    return runs


def ceiling_by_round(unbatched: list[dict], batched: list[dict], fixed: dict[str, list[dict]]) -> dict:
    """`batching_ceiling` of each round (the fixed cost measured in the same round): the round with
    the median ratio, with every round's ratios beside it."""
    rounds = [
        batching_ceiling(u, b, {"unbatched": fu, "batched": fb})
        for u, b, fu, fb in zip(unbatched, batched, fixed["unbatched"], fixed["batched"])
    ]
    middle = sorted(rounds, key=lambda c: c["ratio"])[(len(rounds) - 1) // 2]
    return {
        **middle,
        "ratio_runs": [c["ratio"] for c in rounds],
        "signature_ratio_runs": [c["signature_ratio"] for c in rounds],
    }


def median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one of an even count), with every
    run's throughput beside it, so that its latencies and CPU figures are one measurement's."""
    chosen = sorted(runs, key=lambda r: r["throughput_rps"])[(len(runs) - 1) // 2]
    return {**chosen, "throughput_rps_runs": [r["throughput_rps"] for r in runs]}


def paired_ratio(numerator: list[dict], denominator: list[dict]) -> dict:
    """Throughput ratios of two scenarios round by round, and their median."""
    ratios = [a["throughput_rps"] / b["throughput_rps"] for a, b in zip(numerator, denominator)]
    return {"median": float(np.median(ratios)), "runs": ratios}


def to_markdown(result: dict) -> str:
    rows = [
        "| scenario | clients | requests | errors | throughput (req/s) | req/s in each round | p50 (ms) | p99 (ms) "
        "| mean batch | server CPU/request (ms) | client CPU/request (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    tuned = result["tuned"]
    tuned_text = " ".join(tuned["flags"])
    threads = result["batching"]["num_batch_threads"]
    scenarios = [("gRPC, unbatched", result["unbatched"])] + [
        (f"gRPC, batched, num_batch_threads={k}" + (" (target)" if int(k) == threads else ""), r)
        for k, r in result["batched_by_num_batch_threads"].items()
    ] + [
        (f"REST, batched, num_batch_threads={threads}", result["rest_batched"]),
        (f"Open Inference Protocol REST, batched, num_batch_threads={threads}", result["v2_rest_batched"]),
        (f"Open Inference Protocol gRPC, batched, num_batch_threads={threads}", result["v2_grpc_batched"]),
        (f"gRPC, unbatched, `{tuned_text}`", tuned["unbatched"]),
        (f"gRPC, batched, num_batch_threads={threads}, `{tuned_text}`", tuned["batched"]),
    ]
    for name, r in scenarios:
        each = ", ".join(f"{x:.0f}" for x in r["throughput_rps_runs"])
        rows.append(
            f"| {name} | {r['clients']} | {r['requests']} | {r['errors']} | {r['throughput_rps']:.1f} | {each} | "
            f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['mean_batch_size_seen']:.1f} "
            f"| {r['server_cpu_ms_per_request']:.2f} | {r['client_cpu_ms_per_request']:.2f} |"
        )
    single = result["batch1_latency"]
    targets = result["targets"]
    ceiling = result["batching_ceiling"]
    tuned_ceiling = tuned["batching_ceiling"]

    def runs(values: list[float]) -> str:
        return "each round: " + ", ".join(f"{x:.2f}" for x in values)

    return "\n".join([
        "# Serving benchmark",
        "",
        f"Machine: {result['machine']['cpus']} CPUs ({result['machine']['platform']}), load average "
        f"{result['machine']['load_before']} before, {result['machine']['load_after']} after. "
        f"Model: {result['model']}. Server: `kvlm serve` subprocess; clients: threads in the benchmark process "
        "(one channel each, one example per request, sharing the machine with the server).",
        "",
        f"Each of {result['rounds']} rounds runs every scenario once, in the order of the table, each on a fresh "
        "server; a row shows the round with the median throughput, and the throughput of every round. "
        "Ratios are taken within a round, whose scenarios share the machine's state, and their median is reported.",
        "",
        f"Batching: max_batch_size {result['batching']['max_batch_size']}, batch_timeout_micros "
        f"{result['batching']['batch_timeout_micros']}. With num_batch_threads=1 one batch runs at a time and "
        "TensorFlow's intra-op threads use every core for it; with more threads than the machine has spare cores, "
        "batches run side by side, stay smaller and cost more per example. "
        f"The last two rows run the server with `{tuned_text}` (each op on one core; "
        "concurrent requests or batches use the cores instead).",
        "",
        *rows,
        "",
        f"Batch-1 latency (1 client, no batching, {single['calls']} calls alternating with direct calls): "
        f"server p50 {single['server_p50_ms']:.2f} ms, direct in-process call p50 {single['direct_p50_ms']:.2f} ms "
        f"(ratio {single['ratio']:.2f}).",
        "",
        "Fixed cost of a request, measured in every round on a signature computing `0.5 * x + 2` with the same "
        f"clients: server and client CPU together {ceiling['fixed_cpu_ms_per_request']['unbatched']:.2f} ms per "
        f"request unbatched and {ceiling['fixed_cpu_ms_per_request']['batched']:.2f} ms batched in the round with "
        f"the median ceiling, where the model's signature adds "
        f"{ceiling['signature_cpu_ms_per_request']['unbatched']:.2f} ms unbatched and "
        f"{ceiling['signature_cpu_ms_per_request']['batched']:.2f} ms batched. Batching can then reach at most "
        f"{ceiling['ratio']:.2f}x on cores that server and clients share ({runs(ceiling['ratio_runs'])}), and "
        f"{ceiling['signature_ratio']:.2f}x if requests cost nothing but their signature "
        f"({runs(ceiling['signature_ratio_runs'])}). With `{tuned_text}` the signature costs "
        f"{tuned_ceiling['signature_cpu_ms_per_request']['unbatched']:.2f} ms unbatched and "
        f"{tuned_ceiling['signature_cpu_ms_per_request']['batched']:.2f} ms batched: at most "
        f"{tuned_ceiling['ratio']:.2f}x ({runs(tuned_ceiling['ratio_runs'])}), and "
        f"{tuned_ceiling['signature_ratio']:.2f}x with free requests ({runs(tuned_ceiling['signature_ratio_runs'])}).",
        "",
        f"- batched / unbatched throughput: {targets['throughput_ratio']:.2f}x, median of rounds "
        f"({runs(targets['throughput_ratio_runs'])}) "
        f"(target >= {THROUGHPUT_TARGET}): {'met' if targets['throughput_met'] else 'MISSED'}",
        f"- the same with `{tuned_text}` on both servers: {tuned['throughput_ratio']:.2f}x "
        f"({runs(tuned['throughput_ratio_runs'])}); unbatched {tuned['unbatched']['throughput_rps']:.0f} req/s against "
        f"{result['unbatched']['throughput_rps']:.0f} with TensorFlow's default thread pools",
        f"- server p50 / direct p50 at batch 1: {targets['latency_ratio']:.2f}x (target <= {LATENCY_TARGET:.2f}): "
        f"{'met' if targets['latency_met'] else 'MISSED'}",
        f"- errors: {targets['errors']} (target 0): {'met' if targets['errors'] == 0 else 'MISSED'}",
        "",
        f"Command: `{result['command']}`",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=None, help="run folder to export (default: a tiny random-weight run)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=100, help="requests per client")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every load scenario")
    parser.add_argument("--single-calls", type=int, default=300, help="batch-1 calls per side")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-micros", type=int, default=2000)
    parser.add_argument("--batch-threads", type=int, default=1,
                        help="num_batch_threads: 1 runs one batch at a time, TensorFlow using every core for it")
    parser.add_argument("--compare-batch-threads", type=int, nargs="*", default=[2],
                        help="also measure these num_batch_threads values (reported, not used for the target)")
    parser.add_argument("--tuned-flags", default="--tensorflow_intra_op_parallelism 1",
                        help="server flags of the tuned unbatched and batched scenarios")
    parser.add_argument("--output", default=str(common.RESULTS), help="folder for serving.json and serving.md")
    args = parser.parse_args(argv)

    from kvlm.export.testing import example_requests
    from kvlm.export.warmup import make_predict_request

    tuned_flags = args.tuned_flags.split()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        version_dir = prepare(args.run, Path(tmp))
        image_size = json.loads((version_dir / "assets.extra" / "kvlm.json").read_text())["image_size"]
        images, texts = example_requests(64, image_size=image_size)
        requests = [make_predict_request("kvlm", [i], [t]) for i, t in zip(images, texts)]
        base_path = version_dir.parent

        batching = {}
        for threads in (args.batch_threads, *args.compare_batch_threads):
            config = Path(tmp) / f"batching_{threads}.config"
            config.write_text(BATCHING.format(
                max_batch_size=args.max_batch_size, timeout=args.batch_timeout_micros, threads=threads
            ))
            batching[threads] = ["--enable_batching", "--batching_parameters_file", str(config)]
        affine_base, affine_request = write_affine(Path(tmp))
        more = {"rest": rest_bodies(images, texts), "v2_rest": v2_rest_bodies(images, texts),
                "v2_grpc": v2_grpc_requests(images, texts)}
        scenarios = {
            "unbatched": Scenario(base_path, [], requests),
            **{
                f"batched_{k}": Scenario(base_path, flags, requests, more if k == args.batch_threads else None)
                for k, flags in batching.items()
            },
            "tuned_unbatched": Scenario(base_path, tuned_flags, requests),
            "tuned_batched": Scenario(base_path, batching[args.batch_threads] + tuned_flags, requests),
            "fixed_unbatched": Scenario(affine_base, [], [affine_request]),
            "fixed_batched": Scenario(affine_base, batching[args.batch_threads], [affine_request]),
        }
        latencies = {}

        def on_start(name: str, server: ServerProcess) -> None:
            if name == "unbatched":
                latencies["direct"], latencies["served"] = batch1_latencies(
                    version_dir, server.target, requests[0], images[0], texts[0], args.single_calls
                )

        runs = run_rounds(scenarios, args, on_start)

    fixed_runs = {"unbatched": runs["fixed_unbatched"], "batched": runs["fixed_batched"]}
    fixed = {k: median_run(v) for k, v in fixed_runs.items()}

    unbatched = median_run(runs["unbatched"])
    batched_runs = {k: median_run(runs[f"batched_{k}"]) for k in batching}
    batched = batched_runs[args.batch_threads]
    rest_batched = median_run(runs[f"batched_{args.batch_threads}_rest"])
    v2_rest_batched = median_run(runs[f"batched_{args.batch_threads}_v2_rest"])
    v2_grpc_batched = median_run(runs[f"batched_{args.batch_threads}_v2_grpc"])
    direct_p50 = percentile(latencies["direct"], 50) * 1e3
    served_p50 = percentile(latencies["served"], 50) * 1e3
    ratio = paired_ratio(runs[f"batched_{args.batch_threads}"], runs["unbatched"])
    tuned_ratio = paired_ratio(runs["tuned_batched"], runs["tuned_unbatched"])
    result = {
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "grpcio": grpc.__version__,
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()],
        },
        "model": f"run {args.run}" if args.run else "kvlm_tiny (CNN encoder, random weights), 32x32 PNG + question",
        "rounds": args.rounds,
        "batching": {
            "max_batch_size": args.max_batch_size, "batch_timeout_micros": args.batch_timeout_micros,
            "num_batch_threads": args.batch_threads, "max_enqueued_batches": 100,
        },
        "unbatched": unbatched,
        "batched": batched,
        "batched_by_num_batch_threads": {str(k): v for k, v in batched_runs.items()},
        "rest_batched": rest_batched,
        "v2_rest_batched": v2_rest_batched,
        "v2_grpc_batched": v2_grpc_batched,
        "tuned": {
            "flags": tuned_flags,
            "unbatched": median_run(runs["tuned_unbatched"]),
            "batched": median_run(runs["tuned_batched"]),
            "throughput_ratio": tuned_ratio["median"],
            "throughput_ratio_runs": tuned_ratio["runs"],
        },
        "fixed_cost": fixed,
        "batching_ceiling": ceiling_by_round(runs["unbatched"], runs[f"batched_{args.batch_threads}"], fixed_runs),
        "batch1_latency": {
            "calls": len(latencies["served"]), "server_p50_ms": served_p50,
            "server_p99_ms": percentile(latencies["served"], 99) * 1e3,
            "direct_p50_ms": direct_p50, "direct_p99_ms": percentile(latencies["direct"], 99) * 1e3,
            "ratio": served_p50 / direct_p50,
        },
        "command": ("python bench/serving.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip(),
    }
    tuned = result["tuned"]
    tuned["batching_ceiling"] = ceiling_by_round(runs["tuned_unbatched"], runs["tuned_batched"], fixed_runs)
    result["targets"] = {
        "throughput_ratio": ratio["median"],
        "throughput_ratio_runs": ratio["runs"],
        "throughput_met": ratio["median"] >= THROUGHPUT_TARGET,
        "latency_ratio": result["batch1_latency"]["ratio"],
        "latency_met": result["batch1_latency"]["ratio"] <= LATENCY_TARGET,
        "errors": sum(r["errors"] for scenario in runs.values() for r in scenario),
    }
    common.write_results(args.output, "serving", result, to_markdown(result))
    print(to_markdown(result))
    return 0 if result["targets"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
