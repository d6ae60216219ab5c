#!/usr/bin/env bash
# The agent's GPU checks in one command, for a machine with an NVIDIA GPU and no Rust toolchain. Build the bundle
# where Rust is (`cargo xtask gpu-bundle`: the release agent, the agent's test binary and this script, in `.gpu/`),
# carry that folder to the GPU machine and run `.gpu/gpu-check.sh` there. CUDA's libraries are found through
# ldconfig; never put the toolkit's stubs/ directory on LD_LIBRARY_PATH (every call then fails with
# CUDA_ERROR_STUB_LIBRARY). About 5 minutes on an H100.
set -u
cd "$(dirname "$0")"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader
echo "== the GPU path against the CPU path (F32, F16, BF16), and the staged copy against a plain pinned copy"
KILN_TEST_CUDA=1 timeout 240 ./agent_tests --ignored --nocapture --test-threads=1 cuda 2>&1 | tail -40
echo "== NVML"
timeout 60 ./agent_tests --ignored --nocapture --test-threads=1 nvml 2>&1 | tail -15
echo "== bench-load 2GiB: disk, host RAM, the loader's fill threads, the loader against one plain pinned copy"
timeout 120 ./kiln-agent bench-load --size 2GiB --dir /tmp 2>&1 | tail -20
for dtype in f16 f32; do
  echo "== bench-load --cold-start 1.3GiB $dtype: from the disk cache (page cache warm), CPU and GPU paths"
  timeout 240 ./kiln-agent bench-load --cold-start --size 1.3GiB --dir /tmp --runs 3 --dtype "$dtype" 2>&1 | tail -25
done
