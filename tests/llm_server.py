"""Servers for the LLM tests and the ranker benchmark: the real llama.cpp OpenAI-compatible server, and a tiny
misbehaving OpenAI-compatible endpoint whose faults are chosen by the request itself.

The fake endpoint reads a directive from the last message (chat) or the prompt (completions):
  FAULT=500       always answers HTTP 500            FAULT=429   always answers 429 (rate limit)
  FAULT=SLEEP     sleeps past any sane timeout       FAULT=DROP  closes the connection without answering
  FAULT=GARBAGE   answers 200 with invalid JSON      FAULT=FLAKY answers 500 twice per prompt, then normally
  FAULT=400       answers 400 (a client error: not worth retrying)
  FAULT=NOCHOICES answers 200 with valid JSON that has no choices
  ECHO=NONE       completions without logprobs       (default)   a normal answer
A normal chat answer lists the numbers 1..n of the "N. title" lines it sees in reverse order; a normal
completions answer echoes whitespace tokens with log-prob -1 each (-0.2 for " Paris": a CORRECT echo).
Every request is counted per directive in `hits`, so tests can count retries from the server's side too, and every
accepted TCP connection in `connections` (HTTP/1.1 keep-alive: a client that keeps its pool reuses one).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeEndpoint:
    """An OpenAI-compatible endpoint on 127.0.0.1 in a background thread; `latency_s` delays every answer."""

    def __init__(self, latency_s: float = 0.0, sleep_s: float = 30.0) -> None:
        self.latency_s, self.sleep_s = latency_s, sleep_s
        self.hits: Counter = Counter()
        self.connections = 0
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def setup(self) -> None:  # once per accepted connection
                with endpoint._lock:
                    endpoint.connections += 1
                super().setup()

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                endpoint.handle(self, body)

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeEndpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- behaviour
    def handle(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        text = body.get("prompt") or (body.get("messages") or [{}])[-1].get("content", "")
        text = text if isinstance(text, str) else str(text)
        m = re.search(r"(FAULT|ECHO)=(\w+)", text)
        directive = m.group(0) if m else "OK"
        with self._lock:
            self.hits[directive] += 1
            self._seen[text] += 1
            seen = self._seen[text]
        if self.latency_s:
            time.sleep(self.latency_s)
        if directive == "FAULT=500" or (directive == "FAULT=FLAKY" and seen <= 2):
            return self._send(h, 500, {"error": {"message": "boom", "type": "server_error"}})
        if directive == "FAULT=400":
            return self._send(h, 400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
        if directive == "FAULT=429":
            return self._send(h, 429, {"error": {"message": "slow down", "type": "rate_limit"}})
        if directive == "FAULT=SLEEP":
            time.sleep(self.sleep_s)
            return self._send(h, 200, {})
        if directive == "FAULT=DROP":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
            return None
        if directive == "FAULT=GARBAGE":
            return self._send_raw(h, 200, b'{"choices": [ this is not json')
        if directive == "FAULT=NOCHOICES":
            return self._send(h, 200, {"id": "fake", "object": "chat.completion", "created": 0})
        if h.path.endswith("/chat/completions"):
            return self._send(h, 200, self._chat(body, text))
        if h.path.endswith("/completions"):
            return self._send(h, 200, self._completion(body, text, with_logprobs=directive != "ECHO=NONE"))
        return self._send(h, 404, {"error": {"message": f"no route {h.path}"}})

    @staticmethod
    def _chat(body: dict, text: str) -> dict:
        numbers = re.findall(r"^(\d+)\. ", text, flags=re.M)
        answer = "\n".join(f"{i}. [{n}]" for i, n in enumerate(reversed(numbers), start=1)) or "no idea"
        return {"id": "fake", "object": "chat.completion", "created": 0, "model": body.get("model", "fake"),
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": answer}}],
                "usage": {"prompt_tokens": len(text.split()), "completion_tokens": len(answer.split()),
                          "total_tokens": len(text.split()) + len(answer.split())}}

    @staticmethod
    def _completion(body: dict, text: str, with_logprobs: bool) -> dict:
        tokens = re.findall(r"\s*\S+", text) + ["."]
        logprobs = None
        if with_logprobs:
            lps = [None] + [-0.2 if t == " Paris" else -1.0 for t in tokens[1:]]
            offsets, pos = [], 0
            for t in tokens:
                offsets.append(pos)
                pos += len(t)
            logprobs = {"tokens": tokens, "token_logprobs": lps, "text_offset": offsets,
                        "top_logprobs": [None] + [{t: lp} for t, lp in zip(tokens[1:], lps[1:])]}
        return {"id": "fake", "object": "text_completion", "created": 0, "model": body.get("model", "fake"),
                "choices": [{"index": 0, "text": text + ".", "finish_reason": "length", "logprobs": logprobs}],
                "usage": {"prompt_tokens": len(tokens) - 1, "completion_tokens": 1, "total_tokens": len(tokens)}}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        FakeEndpoint._send_raw(h, status, json.dumps(payload).encode())

    @staticmethod
    def _send_raw(h: BaseHTTPRequestHandler, status: int, data: bytes) -> None:
        try:
            h.send_response(status)
            h.send_header("content-type", "application/json")
            h.send_header("content-length", str(len(data)))
            h.end_headers()
            h.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


# `python -m llama_cpp.server` with llama.cpp's extra CPU buffer types (weight repacking, AMX) switched off. With
# them, llama-cpp-python 0.3.36 segfaults in llama_decode as soon as a batch asks for the logits of every token
# (--logits_all, which echo + logprobs needs) on CPUs with AMX (exit code -11 at the first request); the server
# exposes no option for it, so the model's default parameters are patched before the server's own main runs.
_LLAMA_SERVER_MAIN = """
import runpy
import llama_cpp.llama_cpp as lc
_defaults = lc.llama_model_default_params
def _no_extra_buffer_types():
    params = _defaults()
    params.use_extra_bufts = False
    return params
lc.llama_model_default_params = _no_extra_buffer_types
runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
"""


class LlamaServer:
    """`python -m llama_cpp.server` (see _LLAMA_SERVER_MAIN) on a free port with the given GGUF; started and stopped
    by the caller."""

    def __init__(self, gguf: Path, alias: str, threads: int = 1, n_ctx: int = 2048) -> None:
        self.port = free_port()
        self.alias = alias
        self.cmd = [sys.executable, "-c", _LLAMA_SERVER_MAIN, "--model", str(gguf), "--model_alias", alias,
                    "--host", "127.0.0.1", "--port", str(self.port), "--logits_all", "true",
                    "--n_ctx", str(n_ctx), "--n_threads", str(threads)]
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 120.0) -> "LlamaServer":
        import urllib.request

        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=lambda: self.log.extend(self.proc.stdout), daemon=True).start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}:\n{''.join(self.log[-20:])}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"llama.cpp server not ready after {timeout_s} s:\n{''.join(self.log[-20:])}")

    def assert_alive(self) -> None:
        """Raise with the server's exit code and log tail if it died (a crash shows as a negative exit code)."""
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"llama.cpp server is not running (exit code {code}):\n{''.join(self.log[-30:])}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of a REAL server, for fault tests: it forwards every request, and
    - `error_every = k` answers HTTP 500 instead of forwarding every k-th request (k = 0: never);
    - `delay_s` holds every answer that long (a server slower than the client's timeout);
    - `die_after = n` goes down after forwarding n requests, as a killed server does: the port is closed
      (connection refused) and open keep-alive connections are dropped; `up()` listens on the same port again.
    `forwarded`, `errors` count what it did."""

    def __init__(self, target_base_url: str) -> None:
        import urllib.parse

        target = urllib.parse.urlsplit(target_base_url)
        self.target_host, self.target_port = target.hostname, target.port
        self.port = free_port()
        self.error_every, self.delay_s, self.die_after = 0, 0.0, None
        self.forwarded = self.errors = self._seen = 0
        self.is_down = False
        self._lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _relay(self) -> None:
                import http.client

                body = self.rfile.read(int(self.headers.get("content-length", 0) or 0))
                with proxy._lock:
                    proxy._seen += 1
                    seen = proxy._seen
                    down = proxy.is_down or (proxy.die_after is not None and proxy.forwarded >= proxy.die_after)
                    fail = not down and proxy.error_every and seen % proxy.error_every == 0
                    if fail:
                        proxy.errors += 1
                if down:
                    self.close_connection = True
                    threading.Thread(target=proxy.down, daemon=True).start()
                    return  # dropped without an answer, then the port closes
                if proxy.delay_s:
                    time.sleep(proxy.delay_s)
                if fail:
                    data = b'{"error": {"message": "injected fault", "code": 500}}'
                    self.send_response(500)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(proxy.target_host, proxy.target_port, timeout=600)
                try:
                    conn.request(self.command, self.path, body=body or None,
                                 headers={"content-type": self.headers.get("content-type", "application/json")})
                    resp = conn.getresponse()
                    data = resp.read()
                except OSError:  # the real server is gone (test teardown): drop the connection like it would
                    self.close_connection = True
                    return
                finally:
                    conn.close()
                with proxy._lock:
                    proxy.forwarded += 1
                self.send_response(resp.status)
                self.send_header("content-type", resp.getheader("content-type", "application/json"))
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_GET = _relay  # noqa: N815 - http.server API

        return Handler

    def up(self) -> "FaultProxy":
        self.is_down = False
        self.die_after = None
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def down(self) -> None:
        with self._lock:
            self.is_down = True
            server, self.server = self.server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FaultProxy":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
