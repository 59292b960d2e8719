"""SIGTERM on a real `foundry serve` process: drain (new requests 503), finish or stop running ones, exit 0."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from test_serve import (
    COMPLETION,
    LONG,
    ROOT,
    Server,
    build_serve_model,
    http,
    raw_request,
    read_all,
    wait_for,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_serve_model(tmp_path_factory.mktemp("shutdown") / "tiny")


def _events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE response read whole (chunked framing lines dropped)."""
    return [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]


def _first_bytes(sock) -> bytes:
    data = b""
    while b"data: " not in data:  # the stream has started: the request is running
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection: {data!r}"
        data += chunk
    return data


def _wait_draining(server: Server) -> None:
    deadline = time.monotonic() + 30
    while http(server, "GET", "/health")[0] != 503:  # the signal handler has run
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.01)


def test_sigterm_lets_running_requests_finish_refuses_new_ones_and_exits_0(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "log", "--shutdown-grace", "60")
    try:
        sock = raw_request(server, "/v1/completions", {**COMPLETION, "max_tokens": 4000, "temperature": 0,
                                                        "stream": True})
        head = _first_bytes(sock)
        server.proc.send_signal(signal.SIGTERM)
        _wait_draining(server)
        status, payload, _ = http(server, "POST", "/v1/completions", COMPLETION)
        assert status == 503 and payload["error"]["code"] == "server_shutting_down"
        events = _events(head + read_all(sock))
        assert events[-1] == "[DONE]"
        finish = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finish[-1] == "length"  # it ran to its budget: 4000 tokens
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


@pytest.mark.slow
def test_sigterm_lets_every_request_of_the_running_batch_finish(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "log", "--shutdown-grace", "60")
    try:
        socks = [raw_request(server, "/v1/completions", {**COMPLETION, "prompt": f"hi {i}", "max_tokens": 600,
                                                          "temperature": 0, "stream": True}) for i in range(3)]
        heads = [_first_bytes(sock) for sock in socks]
        wait_for(server, lambda m: m["foundry_requests_running"] == 3, "three running side by side")
        server.proc.send_signal(signal.SIGTERM)
        for head, sock in zip(heads, socks):
            events = _events(head + read_all(sock))
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_sigterm_stops_what_outlives_the_grace_period_and_exits_0(model_dir, tmp_path):
    server = Server(model_dir, tmp_path / "log", "--shutdown-grace", "0.2", "--max-tokens", str(LONG))
    try:
        sock = raw_request(server, "/v1/completions", {**COMPLETION, "max_tokens": LONG, "temperature": 0,
                                                        "stream": True})
        head = _first_bytes(sock)
        server.proc.send_signal(signal.SIGTERM)
        events = _events(head + read_all(sock))
        assert json.loads(events[-1])["error"]["code"] == "server_shutting_down"  # said in the stream, not cut
        assert server.proc.wait(timeout=60) == 0
    finally:
        server.stop()


def test_a_model_that_cannot_load_ends_the_server_with_one_line(model_dir, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(model_dir, broken)
    for f in broken.glob("tokenizer*.json"):
        f.unlink()
    run = subprocess.run([sys.executable, "-m", "foundry.cli.serve", str(broken), "--port", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (f"foundry serve: error: {broken} has no tokenizer.json: "
                                                   "text generation needs the model's tokenizer")
