#!/usr/bin/env python3
"""Cold starts of a realistic model end to end through `kiln up`: the figures issue 15 asks for.

Makes a dense model (`kiln-agent make-model`, 1.34 GB of f16 by default), serves it from a manifest of its own
through `kiln up` (real GPUs where NVML finds them, simulated ones and the CPU path where it finds none), and times
predictions as a client sees them:
  1. the first start: the file is fetched into Kiln's disk cache (hashed once); the page cache is warm, since the
     file was just written;
  2. a warm prediction, and the GPU memory the replica holds (the agent's report and nvidia-smi);
  3. after the keep-alive let the replica go: a start from the idle GPU copy;
  4. after `kiln up` restarted (no GPU copies left): a start from the disk cache, page cache warm, with the bytes
     the weight cache hashed (a hit hashes nothing).
Each start prints the client's wall time and the agent's phases (fetch, read, host->device, init).

Usage: gpu-up-check.py [--bin DIR] [--size 1.34GB] [--dtype f16] [--work DIR]
(DIR holds `kiln` and `kiln-agent`; by default the folder of this script, as in `.gpu/`.)
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

PORTS = {"listen": 18080, "agent_listen": 17070, "metrics": 19400, "admin": 19401}
NAME = "big"


def request(method, url, key, body=None, headers=None, timeout=300):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class Kiln:
    def __init__(self, bin_dir, work):
        self.bin_dir, self.work, self.proc = bin_dir, work, None
        self.base = f"http://127.0.0.1:{PORTS['listen']}"

    def start(self):
        path = os.path.join(self.work, "up.log")
        self.log_mark = os.path.getsize(path) if os.path.exists(path) else 0
        log = open(path, "a")
        self.proc = subprocess.Popen(
            [os.path.join(self.bin_dir, "kiln"), "up",
             "--manifests", os.path.join(self.work, "manifests"),
             "--state-dir", os.path.join(self.work, "state"),
             "--listen", f"127.0.0.1:{PORTS['listen']}",
             "--agent-listen", f"127.0.0.1:{PORTS['agent_listen']}",
             "--agent-metrics", f"127.0.0.1:{PORTS['metrics']}",
             "--agent-admin", f"127.0.0.1:{PORTS['admin']}",
             "--shutdown-grace", "2s"],
            stdout=log, stderr=subprocess.STDOUT)
        keys_file = os.path.join(self.work, "state", "api-keys.yaml")
        deadline = time.time() + 60
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"kiln up exited ({self.proc.returncode}); see {self.work}/up.log")
            if os.path.exists(keys_file):
                self.keys = read_keys(keys_file)
                status, body = request("GET", f"{self.base}/kiln/v1/console/deployments", self.keys["*"], timeout=5) \
                    if self.reachable() else (0, "")
                if status == 200 and any(d["name"] == f"default/{NAME}" for d in json.loads(body)["deployments"]):
                    return
            time.sleep(0.2)
        sys.exit(f"kiln up did not serve default/{NAME} within 60 s; see {self.work}/up.log")

    def wait_log(self, needles, seconds):
        """The last line of up.log holding one of `needles`, waiting up to `seconds` for one."""
        deadline = time.time() + seconds
        while True:
            with open(os.path.join(self.work, "up.log"), errors="replace") as f:
                f.seek(self.log_mark)
                hits = [line.strip() for line in f if any(n in line for n in needles)]
            if hits or time.time() >= deadline:
                return hits[-1] if hits else None
            time.sleep(0.1)

    def reachable(self):
        try:
            urllib.request.urlopen(f"{self.base}/healthz", timeout=2).read()
            return True
        except Exception:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def predict(self, width):
        began = time.time()
        status, body = request("POST", f"{self.base}/v1/deployments/default/{NAME}/predictions", self.keys["default"],
                               {"input": {"x": [0.5] * width}}, {"Prefer": "wait"})
        wall = time.time() - began
        if status not in (200, 201):
            sys.exit(f"prediction: HTTP {status}: {body[:2000]}")
        p = json.loads(body)
        if p.get("status") != "succeeded":
            sys.exit(f"prediction {p.get('status')}: {p.get('error')}")
        return wall, p["metrics"]

    def deployment(self):
        _, body = request("GET", f"{self.base}/kiln/v1/console/deployments", self.keys["*"], timeout=10)
        return next(d for d in json.loads(body)["deployments"] if d["name"] == f"default/{NAME}")

    def agent_metric(self, prefix):
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{PORTS['metrics']}/metrics", timeout=5).read().decode()
        except Exception as e:
            return [f"(agent metrics unreadable: {e})"]
        return [line for line in text.splitlines() if line.startswith(prefix)]


def read_keys(path):
    keys, ns = {}, None
    for line in open(path):
        line = line.strip().lstrip("- ").strip()
        if line.startswith("namespace:"):
            ns = line.split(":", 1)[1].strip().strip("'\"")
        elif line.startswith("key:") and ns is not None:
            keys.setdefault(ns, line.split(":", 1)[1].strip().strip("'\""))
    return keys


def gpu_memory_used_mib():
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None


def report(label, wall, metrics, dep, rows):
    c = dep.get("lastColdStart") or {}
    phases = c.get("phasesMs") or {}
    print(f"{label}: client wall {wall:.3f} s; metrics {json.dumps(metrics)}")
    print(f"  agent: source {c.get('source')}, {c.get('seconds')} s from the start decision, phases (ms) "
          f"{json.dumps(phases)}")
    rows.append((label, wall, metrics.get("cold_start_time"), c.get("source"), phases))


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=here)
    ap.add_argument("--size", default="1.34GB")
    ap.add_argument("--dtype", default="f16")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--work", default="/tmp/kiln-up-check")
    ap.add_argument("--keep-alive", default="10s")
    a = ap.parse_args()

    shutil.rmtree(a.work, ignore_errors=True)
    os.makedirs(os.path.join(a.work, "manifests"))
    model = os.path.join(a.work, "model.safetensors")
    subprocess.run([os.path.join(a.bin, "kiln-agent"), "make-model", "--size", a.size, "--dtype", a.dtype,
                    "--width", str(a.width), "--out", model], check=True)
    gib = -(-os.path.getsize(model) // (1 << 30)) + 1
    with open(os.path.join(a.work, "manifests", f"{NAME}.yaml"), "w") as f:
        f.write(f"""apiVersion: kiln.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: {NAME}
  namespace: default
spec:
  model:
    uri: file://{model}
    runtime: native
  gpu:
    count: 1
    memoryPerGpu: {gib}Gi
  scaling:
    minReplicas: 0
    maxReplicas: 1
    targetConcurrency: 8
    keepAlive:
      policy: fixed
      duration: {a.keep_alive}
""")
    print(f"GPU memory used before kiln up: {gpu_memory_used_mib()} MiB")
    kiln, rows = Kiln(a.bin, a.work), []
    try:
        kiln.start()
        wall, m = kiln.predict(a.width)
        report("1. first start (fetch into the disk cache)", wall, m, kiln.deployment(), rows)
        print("  cache hashed:", kiln.agent_metric("kiln_agent_cache_hashed_bytes_total"))
        walls = [kiln.predict(a.width)[0] for _ in range(5)]
        print(f"2. warm predictions: median client wall {sorted(walls)[2] * 1000:.1f} ms")
        print(f"  GPU memory used with the replica warm: {gpu_memory_used_mib()} MiB (nvidia-smi)")
        print("  agent:", kiln.agent_metric("DCGM_FI_DEV_FB_USED{gpu=\"0\""))
        deadline = time.time() + 120
        while kiln.deployment()["replicas"]["ready"] > 0 and time.time() < deadline:
            time.sleep(0.5)
        wall, m = kiln.predict(a.width)
        report("3. after the keep-alive let it go (idle GPU copy)", wall, m, kiln.deployment(), rows)
        kiln.stop()
        kiln.start()
        # A node's agent runs long before its starts: let its CUDA set-up at start (prewarm) finish first.
        ready = kiln.wait_log(("CUDA ready", "CUDA set-up failed"), 20) if shutil.which("nvidia-smi") else None
        print(f"  agent after the restart: {ready or '(no CUDA set-up line)'}")
        print(f"  GPU memory used after that set-up, no replica yet: {gpu_memory_used_mib()} MiB (nvidia-smi)")
        before = kiln.agent_metric("kiln_agent_cache_hashed_bytes_total")
        wall, m = kiln.predict(a.width)
        report("4. after a restart (disk cache, page cache warm)", wall, m, kiln.deployment(), rows)
        print("  cache hashed before / after this start:", before, kiln.agent_metric("kiln_agent_cache_hashed_bytes_total"))
        print(f"  GPU memory used with the replica warm: {gpu_memory_used_mib()} MiB (nvidia-smi)")
    finally:
        kiln.stop()
    print(f"\n== kiln up, {a.size} {a.dtype} model: cold starts as the client sees them")
    print(f"{'start':52} {'client s':>9} {'cold_start_time':>16} {'source':>8}  phases ms")
    for label, wall, cst, source, phases in rows:
        cst = "-" if cst is None else f"{cst:.3f}"
        print(f"{label:52} {wall:9.3f} {cst:>16} {str(source):>8}  {json.dumps(phases)}")


if __name__ == "__main__":
    main()
