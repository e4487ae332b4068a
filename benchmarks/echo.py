"""A bare gRPC echo server: the ceiling of Python gRPC on this machine.

One unary method, `/kopilka.bench.Echo/Echo`, registered through a generic
handler with no serializers (the request's bytes are the response), no
interceptor, no authentication, no work: everything a Kopilka RPC costs
beyond this is the server's own. Same transport and server options as
`kopilka.servers.app` (grpc.aio, plaintext on loopback).

    python benchmarks/echo.py --listen 127.0.0.1:0    # prints "READY <port>"

`benchmarks/load.py` runs it as a subprocess for its echo baseline; SIGTERM
or SIGINT stops it.
"""

import argparse
import asyncio
import signal

import grpc

SERVICE = "kopilka.bench.Echo"
METHOD = f"/{SERVICE}/Echo"
MAX_MESSAGE = 64 << 20  # as kopilka.servers.app


async def _echo(request, context):
    return request


async def serve(listen, ready=None):
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", MAX_MESSAGE),
                                      ("grpc.max_send_message_length", MAX_MESSAGE),
                                      ("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)}),))
    port = server.add_insecure_port(listen)
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    if ready is not None:
        ready(port)
    await stopping.wait()
    await server.stop(1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0",
                        help="host:port (port 0: any free port; default %(default)s)")
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, lambda port: print(f"READY {port}", flush=True)))


if __name__ == "__main__":
    main()
