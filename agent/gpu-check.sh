#!/usr/bin/env bash
# The agent's GPU checks in one command, for a machine with an NVIDIA GPU and no Rust toolchain. Build the bundle
# where Rust is (`cargo xtask gpu-bundle`: the release agent and kiln, the agent's test binary, this script and
# gpu-up-check.py, in `.gpu/`),
# carry that folder to the GPU machine and run `.gpu/gpu-check.sh` there. CUDA's libraries are found through
# ldconfig; never put the toolkit's stubs/ directory on LD_LIBRARY_PATH (every call then fails with
# CUDA_ERROR_STUB_LIBRARY). About a minute on an H100 (55-61 s, 2026-11-27); each step has its own time limit
# (11 minutes together).
set -u
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
echo "== the GPU path against the CPU path (F32, F16, BF16), and the staged copy against a plain pinned copy"
KILN_TEST_CUDA=1 timeout 150 ./agent_tests --ignored --nocapture --test-threads=1 cuda 2>&1 | tail -40
echo "== NVML"
timeout 40 ./agent_tests --ignored --nocapture --test-threads=1 nvml 2>&1 | tail -15
echo "== bench-load 2GiB: disk, host RAM, the loader's fill threads, the loader against one plain pinned copy"
timeout 90 ./kiln-agent bench-load --size 2GiB --dir /tmp 2>&1 | tail -20
cold_start() {
  echo "== bench-load --cold-start 1.3GiB $1: from the disk cache (page cache warm) and host RAM, CPU and GPU paths"
  timeout 100 ./kiln-agent bench-load --cold-start --size 1.3GiB --dir /tmp --runs 3 --dtype "$1" 2>&1 | tail -25
}
cold_start f16
echo "== kiln up: a 1.34 GB f16 model, cold starts as a client sees them (first fetch, idle GPU copy, disk cache)"
timeout 150 python3 ./gpu-up-check.py --bin . --size 1.34GB --dtype f16 2>&1 | tail -30
cold_start f32
