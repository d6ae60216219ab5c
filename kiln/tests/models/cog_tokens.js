// A Cog-style model server that streams, for the Replicate client tests (Node's standard library only); the same
// behaviour as cog_tokens.py. Listens on 127.0.0.1:$PORT. `GET /health-check` answers 200 (the readiness path).
// `POST /predictions` with `{"input": {"tokens": N, "delay": S}}` produces N tokens, S seconds apart; each token is
// `t<i>@<time it was produced, Unix seconds>`. With `Accept: text/event-stream` the answer is Cog's server-sent event
// stream (`start`, an `output` event `{"chunk", "index"}` per token as it is produced, then `completed` with the
// whole prediction; written in HTTP chunks); otherwise the whole prediction as JSON. It exits when the process that
// started it (the agent) is gone, as a test kills `kiln up` with SIGKILL.
const http = require("http");

const parent = process.ppid;
setInterval(() => process.ppid !== parent && process.exit(0), 500).unref();

const sleep = (s) => new Promise((resolve) => setTimeout(resolve, s * 1000));

http
  .createServer((req, res) => {
    const json = (status, body) => {
      res.writeHead(status, { "Content-Type": "application/json" });
      res.end(JSON.stringify(body));
    };
    if (req.method === "GET") return json(req.url === "/health-check" ? 200 : 404, { status: "READY" });
    if (req.url !== "/predictions") return json(404, { detail: "not found" });
    let body = "";
    req.on("data", (c) => (body += c));
    req.on("end", async () => {
      const input = (JSON.parse(body || "{}").input) || {};
      const count = input.tokens ?? 5;
      const delay = input.delay ?? 0.2;
      const stream = (req.headers.accept || "").includes("text/event-stream");
      const event = (name, data) => res.write(`event: ${name}\ndata: ${JSON.stringify(data)}\n\n`);
      if (stream) {
        res.writeHead(200, { "Content-Type": "text/event-stream" });
        event("start", { status: "processing" });
      }
      const output = [];
      for (let i = 0; i < count; i++) {
        if (i) await sleep(delay);
        const token = `t${i}@${(Date.now() / 1000).toFixed(6)}`;
        output.push(token);
        if (stream) event("output", { chunk: token, index: i });
      }
      if (stream) {
        event("completed", { status: "succeeded", output });
        res.end();
      } else {
        json(200, { status: "succeeded", output });
      }
    });
  })
  .listen(Number(process.env.PORT), "127.0.0.1");
