"""What a student's kernel sends the grader passes through a relay process of bounded memory.

A kernel controls every byte it sends. zmq takes in a message of many parts whole before its reader
sees any part (its queue limit counts messages, not parts or bytes), and a kernel can send one message
of a hundred 8 MB parts from a single buffer in milliseconds: a client in the grading process would
hold all of it (815 MB measured, whatever thread reads). So no socket to a kernel lives in the grading
process. The kernel's client sockets (iopub and shell, the only channels the grader uses) live in this
relay, one small process a kernel, whose address space is limited (RLIMIT_AS, `MEMORY_MB`):

- zmq refuses a message part over ``limit`` bytes before reading it (MAXMSGSIZE; the connection is
  dropped and made again) and queues at most `RECEIVE_QUEUE` messages a socket (the rest wait in the
  kernel's own memory); a message whose parts add up to more than ``limit`` is read and dropped;
- each message that passes goes to the grader over a pipe, framed as `_write_record` writes it; dropped
  messages and lost connections are announced as records of their own;
- a kernel that makes the relay exceed its memory kills the relay, not the grader: the grader then
  stops the kernel and flags the submission (`RelayClient.gone`).

    python autograder/relay.py CONNECTION_FILE LIMIT_BYTES SHELL_IDENTITY_HEX    (started by RelayClient)

`RelayClient` is the grader's side: the part of a Jupyter client the grader uses (execute, kernel_info,
messages of iopub and shell), signing and checking messages with the kernel's key as jupyter_client does.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import subprocess
import sys
import threading
import time

RECEIVE_QUEUE = 4   # messages zmq may queue on each of the relay's sockets
MEMORY_MB = 768     # the relay's address space: about 60 MB resident, the rest mapped by Python and zmq
_HEADER = struct.Struct(">cI")  # record: a tag (i: iopub, s: shell, r: refused, d: disconnected), part count


def _write_record(fd: int, tag: bytes, parts: list[bytes]) -> None:
    data = _HEADER.pack(tag, len(parts)) + b"".join(struct.pack(">Q", len(p)) for p in parts)
    for chunk in (data, *parts):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def _read_exact(stream, n: int) -> bytes:
    """``n`` bytes from ``stream`` (a pipe gives at most its buffer's size a read)."""
    chunks, left = [], n
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_record(stream) -> tuple[bytes, list[bytes]]:
    tag, count = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    sizes = struct.unpack(f">{count}Q", _read_exact(stream, 8 * count)) if count else ()
    return tag, [_read_exact(stream, size) for size in sizes]


# -- the relay process ------------------------------------------------------------------------------


def _url(info: dict, channel: str) -> str:
    port = info[f"{channel}_port"]
    return f"tcp://{info['ip']}:{port}" if info.get("transport", "tcp") == "tcp" else f"{info['transport']}://{info['ip']}-{port}"


def _receive(socket, limit: int) -> list[bytes] | None:
    """One message, part by part: its parts, or None when they add up to more than ``limit``."""
    parts, size = [], 0
    while True:
        frame = socket.recv(copy=False)
        size += len(frame)
        if size <= limit:
            parts.append(frame.bytes)
        elif parts:
            parts = []
        if not frame.more:
            return parts if size <= limit else None


def _connect(context, info: dict, channel: str, identity: bytes):
    """A socket of ``channel`` connected to the kernel, and a monitor of its lost connections."""
    import zmq

    socket = context.socket(zmq.SUB if channel == "iopub" else zmq.DEALER)
    if channel == "iopub":
        socket.setsockopt(zmq.SUBSCRIBE, b"")
    else:
        socket.setsockopt(zmq.IDENTITY, identity)
    socket.connect(_url(info, channel))
    return socket, socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)


def relay(connection_file: str, limit: int, identity: bytes) -> None:
    """Pass the kernel's messages to the grader (fd 1) and the grader's requests to the kernel (fd 0).
    A connection zmq dropped (a part over ``limit``: zmq does not connect again after that) is made
    afresh at once; what the kernel sent meanwhile is lost, and the grader is told."""
    import zmq

    info = json.loads(open(connection_file).read())
    context = zmq.Context()
    context.setsockopt(zmq.MAXMSGSIZE, limit)
    context.setsockopt(zmq.RCVHWM, RECEIVE_QUEUE)
    context.setsockopt(zmq.LINGER, 0)
    tags = {"iopub": b"i", "shell": b"s"}
    channels = {name: _connect(context, info, name, identity) for name in tags}
    poller = zmq.Poller()
    for socket, monitor in channels.values():
        poller.register(socket, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
    poller.register(0, zmq.POLLIN)
    grader = os.fdopen(0, "rb", buffering=0)
    while True:
        for item, _ in poller.poll():
            if item == 0:
                try:
                    _, parts = _read_record(grader)
                except EOFError:
                    return  # the grader is done with this kernel
                channels["shell"][0].send_multipart(parts)
                continue
            for name, (socket, monitor) in list(channels.items()):
                if item is socket:
                    parts = _receive(socket, limit)
                    _write_record(1, tags[name] if parts is not None else b"r", parts or [tags[name]])
                elif item is monitor:
                    _write_record(1, b"d", [tags[name]])
                    for old in (socket, monitor):
                        poller.unregister(old)
                    socket.disable_monitor()
                    monitor.close()
                    socket.close()
                    channels[name] = _connect(context, info, name, identity)
                    for new in channels[name]:
                        poller.register(new, zmq.POLLIN)


def main(argv: list[str]) -> int:
    import ctypes
    import resource
    import signal

    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: dies with the grader
    except (OSError, AttributeError):
        pass
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_MB << 20, MEMORY_MB << 20))
    relay(argv[0], int(argv[1]), bytes.fromhex(argv[2]))
    return 0


# -- the grader's side ------------------------------------------------------------------------------


class RelayClient:
    """A kernel client whose sockets live in a relay process. Messages wait for the grader in queues
    holding at most ``budget`` bytes (more are dropped and counted in `refused`)."""

    def __init__(self, connection_file: str, limit: int, budget: int):
        from jupyter_client.session import Session

        info = json.loads(open(connection_file).read())
        self.session = Session(key=info["key"].encode(), signature_scheme=info.get("signature_scheme", "hmac-sha256"))
        self.limit, self.budget = limit, budget
        self.refused = 0                        # messages dropped for their size
        self.disconnects = {"iopub": 0, "shell": 0}
        self.gone: str | None = None            # why the relay ended, once it has
        self._held = 0
        self._lock = threading.Lock()
        self._queues = {"iopub": queue.Queue(), "shell": queue.Queue()}
        env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), connection_file, str(limit),
                                      self.session.bsession.hex()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, start_new_session=True)
        self._reader = threading.Thread(target=self._read, name="peftlab-relay", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        names = {b"i": "iopub", b"s": "shell"}
        try:
            while True:
                tag, parts = _read_record(self.proc.stdout)
                size = sum(map(len, parts))
                with self._lock:
                    if tag == b"r":
                        self.refused += 1
                    elif tag == b"d":
                        self.disconnects[names.get(parts[0], "shell")] += 1
                    elif size > self.limit or self._held + size > self.budget:
                        self.refused += 1
                    else:
                        self._held += size
                        self._queues[names[tag]].put((parts, size))
        except (EOFError, ValueError, KeyError, struct.error, OSError):
            code = self.proc.wait()
            self.gone = (f"the grader's relay for the kernel's messages ended (exit {code}): the kernel sent more "
                         f"than the grader reads" if code else "the grader's relay ended")

    def _get(self, channel: str, timeout: float | None) -> dict:
        parts, size = self._queues[channel].get(timeout=timeout)
        with self._lock:
            self._held -= size
        _, message = self.session.feed_identities(parts)
        return self.session.deserialize(message)

    def get_iopub_msg(self, timeout: float | None = None) -> dict:
        return self._get("iopub", timeout)

    def get_shell_msg(self, timeout: float | None = None) -> dict:
        return self._get("shell", timeout)

    def _send(self, msg_type: str, content: dict) -> str:
        message = self.session.msg(msg_type, content)
        _write_record(self.proc.stdin.fileno(), b"s", self.session.serialize(message))
        return message["header"]["msg_id"]

    def execute(self, code: str, store_history: bool = True, allow_stdin: bool = False, stop_on_error: bool = True) -> str:
        return self._send("execute_request", {"code": code, "silent": False, "store_history": store_history,
                                              "user_expressions": {}, "allow_stdin": allow_stdin,
                                              "stop_on_error": stop_on_error})

    def wait_for_ready(self, timeout: float) -> None:
        """Until the kernel answers a kernel_info request and iopub is seen to pass messages (a SUB
        socket misses what is published before it is connected), as jupyter_client waits."""
        end = time.monotonic() + timeout
        while self.gone is None and time.monotonic() < end:
            msg_id = self._send("kernel_info_request", {})
            if self._reply_to(msg_id, min(1.0, end - time.monotonic())) and self._drain("iopub", 0.2):
                return
        raise RuntimeError(self.gone or f"the kernel did not answer within {timeout:.0f} s")

    def _reply_to(self, msg_id: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while True:
            try:
                reply = self.get_shell_msg(timeout=max(0.0, end - time.monotonic()))
            except queue.Empty:
                return False
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                return True

    def _drain(self, channel: str, timeout: float) -> int:
        """Drop what ``channel`` holds now and sends within ``timeout`` of the last; how many there were."""
        n = 0
        while True:
            try:
                self._get(channel, timeout)
            except queue.Empty:
                return n
            n += 1

    def close(self) -> None:
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout=5)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
