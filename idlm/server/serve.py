"""`idlm serve`: the app under uvicorn. SIGINT/SIGTERM stop admitting requests (503), give the
running ones `shutdown_timeout` seconds to finish, end the rest with a 503 body or an error chunk
and `[DONE]`, then stop the engine loop and exit 0. An engine that fails for good stops the server
the same way and exits 1, so that a supervisor restarts it."""

import signal
import socket

import uvicorn

from idlm.engine.llm_engine import LLMEngine
from idlm.server.app import create_app
from idlm.server.async_engine import AsyncEngine

# what uvicorn gives the last responses to be written after the drain, before it cancels them
WRITE_TIMEOUT_S = 5.0


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before uvicorn starts so a taken port is a clear error (and port 0 works)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # a response written in two parts waits ~40 ms for the client's delayed ACK
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror or e}); pick another --port or --host") from e
    return sock


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, shutdown_timeout: float, ready_message: str):
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout = shutdown_timeout
        self.ready_message = ready_message
        engine.on_fatal = self.exit

    def exit(self) -> None:
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self.ready_message, flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # the drain comes first, with the socket still open: a request that arrives meanwhile gets
        # a 503 body rather than a refused connection, and no response is left for uvicorn to cancel
        await self.engine.drain(self.shutdown_timeout, force=lambda: self.force_exit)
        await super().shutdown(sockets)


def stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt


def serve(engine: LLMEngine, model_name: str, host: str = "127.0.0.1", port: int = 8000, max_queue: int = 256,
          shutdown_timeout: float = 10.0, api_key: str | None = None) -> None:
    """Serves until SIGINT or SIGTERM; raises SystemExit(1) if the engine failed for good."""
    if not shutdown_timeout >= 0:
        raise ValueError(f"--shutdown-timeout must be a number of seconds >= 0, got {shutdown_timeout}")
    async_engine = AsyncEngine(engine, max_queue)
    app = create_app(async_engine, model_name, api_key=api_key)
    sock = listen(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    url = f"http://{f'[{bound_host}]' if ':' in bound_host else bound_host}:{bound_port}"
    print(f"idlm: serving {model_name} at {url} (OpenAI API at {url}/v1, playground at {url}/, "
          f"metrics at {url}/metrics)", flush=True)
    config = uvicorn.Config(app, timeout_graceful_shutdown=WRITE_TIMEOUT_S, lifespan="on")
    server = Server(config, async_engine, shutdown_timeout,
                    ready_message=f"idlm: ready, {async_engine.capacity} requests at most in flight "
                                  f"(max_num_seqs {engine.config.max_num_seqs} + max_queue {max_queue})"
                                  + (", deterministic (batch-invariant kernels)" if engine.config.deterministic
                                     else ""))
    # uvicorn re-raises the signal that stopped it once it is done; both then end here
    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if async_engine.error:
        raise SystemExit(f"idlm: error: {async_engine.error}")
    print("idlm: server stopped", flush=True)
