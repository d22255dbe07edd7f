"""A real gRPC server and client (grpcio) for strait's end-to-end tests.

Messages are raw bytes (identity serializers), so no generated code is needed; the wire is
ordinary gRPC over HTTP/2. Methods of service `color.Color`:
  - Get (unary): answers "<name>:<request>".
  - Chat (bidirectional streaming): answers each message with "<name>:<message>".
The server also implements `grpc.health.v1.Health/Check`, answering SERVING.

  python3 color_grpc.py serve --port 50051 --name v1
  python3 color_grpc.py call --target HOST:PORT --unary 20 --bidi 10 [--metadata k=v] [--method /x.Y/Z]
      [--authority NAME]
  python3 color_grpc.py load --target HOST:PORT --workers 4 --rate 50 --duration 60 [--stop-file F]
  python3 color_grpc.py health --target HOST:PORT [--service NAME]

`health` calls the gRPC Health Checking Protocol's `grpc.health.v1.Health/Check` as a load
balancer or a Kubernetes gRPC probe does and prints one JSON line with the gRPC code and the
serving status (SERVING, NOT_SERVING, UNKNOWN, SERVICE_UNKNOWN).
`call` prints one JSON line and exits 0 only when every call succeeded. `load` runs unary Gets
from several threads over one channel, each thread paced to `--rate` calls per second, until
`--duration` seconds passed or the stop file exists; it counts every call that did not end OK
(grpcio's own transparent retry of streams a server never processed, after a GOAWAY, is the
library's behaviour and stays on; nothing else is retried).
"""

import argparse
import json
import sys
import time
from concurrent import futures

import grpc


def identity(x):
    return x


def serve(args):
    name = args.name.encode()

    def get(request, context):
        return name + b":" + request

    def chat(request_iterator, context):
        for message in request_iterator:
            yield name + b":" + message

    def health(request, context):
        # HealthCheckResponse{status: SERVING}: field 1, varint 1.
        return b"\x08\x01"

    handlers = [
        grpc.method_handlers_generic_handler(
            "color.Color",
            {
                "Get": grpc.unary_unary_rpc_method_handler(get, identity, identity),
                "Chat": grpc.stream_stream_rpc_method_handler(chat, identity, identity),
            },
        ),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health",
            {"Check": grpc.unary_unary_rpc_method_handler(health, identity, identity)},
        ),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=handlers)
    server.add_insecure_port(f"0.0.0.0:{args.port}")
    server.add_insecure_port(f"[::]:{args.port}")
    server.start()
    print(json.dumps({"listening": args.port, "name": args.name}), flush=True)
    server.wait_for_termination()


def call(args):
    report = {"ok": False, "unary": {}, "bidi": {}, "errors": []}
    metadata = [tuple(kv.split("=", 1)) for kv in args.metadata]
    options = [("grpc.default_authority", args.authority)] if args.authority else None
    with grpc.insecure_channel(args.target, options=options) as channel:
        if args.method:
            stub = channel.unary_unary(args.method, request_serializer=identity, response_deserializer=identity)
            try:
                stub(b"x", timeout=args.timeout, metadata=metadata)
                report["code"] = "OK"
            except grpc.RpcError as e:
                report["code"] = e.code().name
                report["details"] = e.details()
            print(json.dumps(report))
            return 0
        get = channel.unary_unary("/color.Color/Get", request_serializer=identity, response_deserializer=identity)
        chat = channel.stream_stream("/color.Color/Chat", request_serializer=identity, response_deserializer=identity)
        ok = True
        for i in range(args.unary):
            try:
                answer = get(f"hello {i}".encode(), timeout=args.timeout, metadata=metadata).decode()
                server, _, echoed = answer.partition(":")
                report["unary"][server] = report["unary"].get(server, 0) + 1
                ok = ok and echoed == f"hello {i}"
            except grpc.RpcError as e:
                ok = False
                report["errors"].append(f"{e.code().name}: {e.details()}")
        if args.bidi:
            sent = [f"stream message {i}".encode() for i in range(args.bidi)]
            received = []
            try:
                # Interleaved: each message is sent only after the previous answer arrived,
                # so both directions really stream.
                import queue

                outbox = queue.Queue()

                def requests():
                    for _ in range(args.bidi):
                        item = outbox.get(timeout=args.timeout)
                        yield item

                outbox.put(sent[0])
                responses = chat(requests(), timeout=args.timeout, metadata=metadata)
                for i, answer in enumerate(responses):
                    received.append(answer.decode())
                    if i + 1 < len(sent):
                        outbox.put(sent[i + 1])
                    if len(received) == len(sent):
                        break
            except grpc.RpcError as e:
                ok = False
                report["errors"].append(f"bidi {e.code().name}: {e.details()}")
            for answer in received:
                server, _, _ = answer.partition(":")
                report["bidi"][server] = report["bidi"].get(server, 0) + 1
            ok = ok and [a.partition(":")[2] for a in received] == [s.decode() for s in sent]
        report["ok"] = ok
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def health(args):
    report = {}
    service = args.service.encode()
    # HealthCheckRequest{service}: field 1, length-delimited (names here are under 128 bytes).
    request = b"\x0a" + bytes([len(service)]) + service if service else b""
    with grpc.insecure_channel(args.target) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check", request_serializer=identity, response_deserializer=identity
        )
        try:
            answer = check(request, timeout=args.timeout)
            report["code"] = "OK"
            # HealthCheckResponse{status}: field 1, varint.
            status = 0 if answer == b"" else answer[1] if len(answer) == 2 and answer[0] == 0x08 else None
            names = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
            report["status"] = names.get(status, f"unreadable {answer!r}")
        except grpc.RpcError as e:
            report["code"] = e.code().name
            report["details"] = e.details()
    print(json.dumps(report))
    return 0


def load(args):
    import threading

    lock = threading.Lock()
    report = {"ok": False, "completed": 0, "failed": 0, "by_server": {}, "codes": {}, "errors": []}
    deadline = time.monotonic() + args.duration

    def stop():
        return time.monotonic() >= deadline or (args.stop_file and _exists(args.stop_file))

    with grpc.insecure_channel(args.target) as channel:
        get = channel.unary_unary("/color.Color/Get", request_serializer=identity, response_deserializer=identity)

        def worker(w):
            interval = 1.0 / args.rate if args.rate > 0 else 0.0
            next_at = time.monotonic()
            i = 0
            while not stop():
                if interval:
                    pause = next_at - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    next_at = max(next_at, time.monotonic() - interval) + interval
                message = f"w{w} {i}"
                i += 1
                try:
                    answer = get(message.encode(), timeout=args.timeout).decode()
                    server, _, echoed = answer.partition(":")
                    with lock:
                        if echoed == message:
                            report["completed"] += 1
                            report["by_server"][server] = report["by_server"].get(server, 0) + 1
                        else:
                            report["failed"] += 1
                            if len(report["errors"]) < 20:
                                report["errors"].append(f"wrong answer {answer!r} to {message!r}")
                except grpc.RpcError as e:
                    with lock:
                        report["failed"] += 1
                        code = e.code().name
                        report["codes"][code] = report["codes"].get(code, 0) + 1
                        if len(report["errors"]) < 20:
                            report["errors"].append(f"{code}: {e.details()}")

        threads = [threading.Thread(target=worker, args=(w,)) for w in range(args.workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    report["ok"] = report["failed"] == 0 and report["completed"] > 0
    print(json.dumps(report), flush=True)
    return 0 if report["ok"] else 1


def _exists(path):
    import os

    return os.path.exists(path)


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--name", required=True)
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--unary", type=int, default=0)
    c.add_argument("--bidi", type=int, default=0)
    c.add_argument("--metadata", action="append", default=[])
    c.add_argument("--method")
    c.add_argument("--authority")
    c.add_argument("--timeout", type=float, default=10.0)
    ld = sub.add_parser("load")
    ld.add_argument("--target", required=True)
    ld.add_argument("--workers", type=int, default=4)
    ld.add_argument("--rate", type=float, default=50.0)
    ld.add_argument("--duration", type=float, default=60.0)
    ld.add_argument("--stop-file")
    ld.add_argument("--timeout", type=float, default=10.0)
    h = sub.add_parser("health")
    h.add_argument("--target", required=True)
    h.add_argument("--service", default="")
    h.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.command == "health":
        return health(args)
    if args.command == "load":
        return load(args)
    if args.command == "serve":
        serve(args)
        return 0
    return call(args)


if __name__ == "__main__":
    sys.exit(main())
