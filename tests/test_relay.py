"""The relay between a kernel and the grader (`autograder.relay`): messages pass, requests of any size
reach the kernel, and what a hostile kernel sends (one part too large, one message of many parts) never
lands in the grading process. A fake kernel (zmq sockets bound here, as ipykernel binds them) stands in."""

from __future__ import annotations

import json
import queue
import sys
import time

import pytest
import zmq

from notebooks import ROOT

sys.path.insert(0, str(ROOT))
from autograder.relay import RelayClient  # noqa: E402

LIMIT = 17 << 20


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


@pytest.fixture
def kernel(tmp_path):
    """(connection file, iopub PUB, shell ROUTER, session) of a fake kernel on ipc sockets."""
    from jupyter_client.session import Session

    info = {"transport": "ipc", "ip": str(tmp_path / "k"), "iopub_port": 1, "shell_port": 2, "key": "secret",
            "signature_scheme": "hmac-sha256"}
    (tmp_path / "connection.json").write_text(json.dumps(info))
    context = zmq.Context()
    iopub, shell = context.socket(zmq.PUB), context.socket(zmq.ROUTER)
    iopub.bind(f"ipc://{info['ip']}-1")
    shell.bind(f"ipc://{info['ip']}-2")
    yield str(tmp_path / "connection.json"), iopub, shell, Session(key=b"secret")
    context.destroy(linger=0)


def _published(client, iopub, session, text: str, timeout: float = 10) -> dict:
    """Publish ``text`` until the client's relay (a SUB that may still be connecting) passes it on."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        session.send(iopub, "stream", {"name": "stdout", "text": text})
        try:
            while True:
                message = client.get_iopub_msg(timeout=0.2)
                if message["content"].get("text") == text:
                    return message
        except queue.Empty:
            continue
    raise AssertionError(f"{text!r} never arrived")


def test_messages_and_large_requests_pass(kernel):
    connection, iopub, shell, session = kernel
    client = RelayClient(connection, LIMIT, 2 * LIMIT)
    try:
        assert _published(client, iopub, session, "x" * (1 << 20))["content"]["text"] == "x" * (1 << 20)
        code = "y = 1\n" * 50_000  # 300 KB: more than a pipe holds at once
        msg_id = client.execute(code)
        shell.setsockopt(zmq.RCVTIMEO, 10_000)
        parts = shell.recv_multipart()
        _, message = session.feed_identities(parts[1:])
        request = session.deserialize(message)
        assert request["content"]["code"] == code and request["header"]["msg_id"] == msg_id
    finally:
        client.close()


def test_what_a_hostile_kernel_sends_never_lands_in_the_grader(kernel):
    connection, iopub, shell, session = kernel
    client = RelayClient(connection, LIMIT, 2 * LIMIT)
    try:
        _published(client, iopub, session, "ready")
        before = _rss_mb()
        buffer = b"x" * (8 << 20)
        iopub.send_multipart([b"topic"] + [buffer] * 100, copy=False)  # 800 MB from one buffer
        iopub.send_multipart([b"topic", b"y" * (20 << 20)], copy=False)  # one part over the limit
        time.sleep(3)
        assert _rss_mb() - before < 100, "the grading process grew"
        assert _published(client, iopub, session, "after")["content"]["text"] == "after", "the relay reads on"
        assert client.refused + sum(client.disconnects.values()) >= 1
    finally:
        client.close()
