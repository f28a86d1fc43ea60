"""`tinylm serve` as a user starts it: a real process, a real port, a key."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx2 as httpx
import pytest

from .conftest import free_port


@pytest.mark.slow  # a fresh interpreter importing torch: ~5 s idle, 20 s on a busy box
def test_tinylm_serve_serves_with_a_key(serve_run):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tinylm", "serve", "--run", str(serve_run),
                             "--port", str(port), "--api-key", "k1", "--dtype", "fp32"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "tinylm serve did not come up"
            time.sleep(0.1)
        assert httpx.get(url + "/v1/models").status_code == 401
        r = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer k1"},
                       json={"model": serve_run.name, "prompt": "The", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
