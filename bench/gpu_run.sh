#!/usr/bin/env bash
# The GPU runs recorded in docs/, as one script per device call (the device machine has no registry:
# pyzmq and pytest-timeout travel as wheels in .whl/, see ../shared/tools/device-wheels.sh).
#
#   bash bench/gpu_run.sh tests    OUT   # GPU tests, transfer_bw, control RTT, server TP/batching (≈ 9 min)
#   bash bench/gpu_run.sh speed    OUT [ARGS]   # bench/train_speed.py --preset gpu-8b [ARGS] (≈ 6 min for the 16 jobs)
#   bash bench/gpu_run.sh pytest   OUT FILES    # some GPU tests again
#
# Every step has its own time limit, logs to OUT/<step>.log and never stops the steps after it.
# Everything lands in OUT/results.tgz (the device tool returns at most 8 files).
set -uo pipefail
what=${1:?tests or speed}
out=${2:?output directory}
shift 2
mkdir -p "$out/r"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_CUDA_ARCH_LIST=9.0
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD

step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*" | tee -a "$out/r/summary.log"
  timeout --kill-after=10 "$limit" "$@" >"$out/r/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0))s" | tee -a "$out/r/summary.log"
  tail -n 4 "$out/r/$name.log" | sed 's/^/   /' | tee -a "$out/r/summary.log"
}

finish() {
  ls -la /dev/shm /dev/shm/a /dev/shm/b >"$out/r/shm_after.log" 2>&1
  rm -rf /dev/shm/zmqdisagg-* /dev/shm/a /dev/shm/b 2>/dev/null
  tar -czf "$out/results.tgz" --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' -C "$out" r
  cp "$out/r/summary.log" "$out/summary.log"
  rm -rf "$out/r"  # only the archive and the summary travel back
}
trap finish EXIT

step env 60 bash -c 'nvidia-smi; nvidia-smi topo -m; python3 -c "import torch, cupy; print(torch.__version__, torch.version.cuda, cupy.__version__, torch.cuda.nccl.version())"; python3 -m zmqdisagg.topology'
step build 120 python3 setup.py build_ext --inplace

case $what in
  tests)  # two groups side by side: GPUs 0,1 for the data plane and its figures; GPUs 2,3 for faults and TP
    mkdir -p /dev/shm/a /dev/shm/b  # separate segment dirs: each pytest session checks its own for leaks
    (
      export ZMQDISAGG_SHM_DIR=/dev/shm/a
      step gpu_tests 200 python3 -m pytest -q -p no:cacheprovider --timeout 120 -rs -s \
        --deselect tests/gpu/test_gpu_faults.py --deselect tests/gpu/test_gpu_soak.py --deselect tests/gpu/test_server_tp_gpu.py \
        tests/gpu tests/test_transport_conformance.py tests/test_pack.py tests/test_nccl_gloo.py tests/test_select.py \
        tests/test_cuda_ipc_push_protocol.py
      step control_rtt 40 python3 bench/control_rtt.py --label "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) host" \
        --json "$out/r/control_rtt.json" --md "$out/r/control_rtt.md"
      step transfer_bw 250 python3 bench/transfer_bw.py --out "$out/r" --transports cuda_ipc,nccl,nccl-net,shm,inline \
        --baselines ce,sm,nccl,nccl-net --paths transport,server --server-transports cuda_ipc,cuda_ipc-pack,nccl \
        --host-max-size 256M --net-max-size 64M --variant-sizes 1M,16M,256M,4G --min-time 0.1 --timeout 120
    ) &
    (
      export CUDA_VISIBLE_DEVICES=2,3 ZMQDISAGG_SHM_DIR=/dev/shm/b
      step gpu_faults 330 python3 -m pytest -q -p no:cacheprovider --timeout 200 -rs -s \
        tests/gpu/test_gpu_faults.py tests/gpu/test_gpu_soak.py tests/gpu/test_server_tp_gpu.py
      step server_tp 150 python3 bench/server_batching.py --model configs/llama-3.1-8b-shape.json --device cuda \
        --dtype bfloat16 --tp 1,2 --batch-tokens 0 --client-device cuda:1 --transport cuda_ipc --seq 4096 \
        --clients 1 --lanes 2 --seconds 6 --warmup 3 --server-threads 4 --out "$out/r"
    ) &
    wait
    ;;
  speed)
    step train_speed 540 python3 bench/train_speed.py --preset gpu-8b --out "$out/r" --work "$out/r/work" "$@"
    ;;
  pytest)
    step gpu_tests 300 python3 -m pytest -q -p no:cacheprovider --timeout 200 -rs -s "$@"
    ;;
  *) echo "unknown: $what (tests, speed or pytest)"; exit 2 ;;
esac
