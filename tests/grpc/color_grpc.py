"""A real gRPC server and client (grpcio) for strait's end-to-end tests.

Messages are raw bytes (identity serializers), so no generated code is needed; the wire is
ordinary gRPC over HTTP/2. Methods of service `color.Color`:
  - Get (unary): answers "<name>:<request>".
  - Chat (bidirectional streaming): answers each message with "<name>:<message>".
The server also implements `grpc.health.v1.Health/Check`, answering SERVING.

  python3 color_grpc.py serve --port 50051 --name v1
  python3 color_grpc.py call --target HOST:PORT --unary 20 --bidi 10 [--metadata k=v] [--method /x.Y/Z]

`call` prints one JSON line and exits 0 only when every call succeeded.
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
    with grpc.insecure_channel(args.target) as channel:
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
    c.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.command == "serve":
        serve(args)
        return 0
    return call(args)


if __name__ == "__main__":
    sys.exit(main())
