"""A Cog-style model server that streams, for the Replicate client tests (Python standard library only).

Listens on 127.0.0.1:$PORT. `GET /health-check` answers 200 (the readiness path). `POST /predictions` with
`{"input": {"tokens": N, "delay": S}}` produces N tokens, S seconds apart; each token is `t<i>@<time it was
produced, Unix seconds>`, so a client can tell when it was produced. With `Accept: text/event-stream` the answer is
Cog's server-sent event stream (`start`, an `output` event `{"chunk", "index"}` per token as it is produced, then
`completed` with the whole prediction); otherwise the whole prediction as JSON, as Cog answers synchronously.
It exits when the process that started it (the agent) is gone, as a test kills `kiln up` with SIGKILL.
"""

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Model(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # the body ends when the connection closes

    def answer(self, status, body, content_type="application/json"):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health-check":
            self.answer(200, {"status": "READY"})
        else:
            self.answer(404, {"detail": "not found"})

    def do_POST(self):
        if self.path != "/predictions":
            return self.answer(404, {"detail": "not found"})
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        given = request.get("input", {})
        count, delay = int(given.get("tokens", 5)), float(given.get("delay", 0.2))

        def tokens():
            for i in range(count):
                if i:
                    time.sleep(delay)
                yield f"t{i}@{time.time():.6f}"

        if "text/event-stream" not in self.headers.get("Accept", ""):
            return self.answer(200, {"status": "succeeded", "output": list(tokens())})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def event(name, data):
            self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()

        event("start", {"status": "processing"})
        output = []
        for i, token in enumerate(tokens()):
            output.append(token)
            event("output", {"chunk": token, "index": i})
        event("completed", {"status": "succeeded", "output": output})

    def log_message(self, *args):
        pass


def exit_with_parent(parent=os.getppid()):
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


threading.Thread(target=exit_with_parent, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Model).serve_forever()
