// One-launch copy of a list of byte ranges (pack, unpack and the SM copy all use it).
//
// Why a kernel and not N cudaMemcpyAsync calls: a reply is a handful of tensors; packing them into one
// transfer slot (or unpacking them out of it) with the copy engine costs one launch each, and for
// mid-size payloads (1-64 MiB) an SM copy over NVLink beats the copy engine outright (338 vs 270 GB/s at
// 16 MiB on H200 in shared/reference/gpu-baselines.md).
//
// Work split: every entry is cut into CHUNK-byte chunks; chunk c belongs to the entry i with
// chunk_end[i-1] <= c < chunk_end[i]. Blocks stride over the global chunk index, so one launch balances
// one 1 GiB tensor and ten 4 KiB ones alike. A chunk is exactly one pass of a block: THREADS threads x
// UNROLL 16-byte vectors, loaded all before any is stored, so each thread keeps UNROLL loads in flight.
#include <cuda_runtime.h>
#include <stdint.h>

#include "copy.h"

namespace {

constexpr int THREADS = 512;
constexpr int UNROLL = 4;
constexpr uint64_t CHUNK = uint64_t(THREADS) * UNROLL * 16;  // 32 KiB

struct CopyBatch {
  ZdCopy e[ZD_MAX_ENTRIES];
  uint64_t chunk_end[ZD_MAX_ENTRIES];  // inclusive prefix sum of chunks per entry
  int n;
};

__device__ __forceinline__ int entry_of(const CopyBatch& b, uint64_t c) {
  int lo = 0, hi = b.n - 1;  // first i with chunk_end[i] > c
  while (lo < hi) {
    int mid = (lo + hi) >> 1;
    if (b.chunk_end[mid] > c) hi = mid; else lo = mid + 1;
  }
  return lo;
}

__device__ __forceinline__ void copy_chunk(const uint8_t* __restrict__ src, uint8_t* __restrict__ dst,
                                           uint64_t len) {
  const bool aligned = ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst)) & 15) == 0;
  uint64_t done = 0;
  if (aligned && len == CHUNK) {  // the hot path: a full chunk of 16-byte vectors
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    uint4 r[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) r[u] = s[threadIdx.x + u * THREADS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) d[threadIdx.x + u * THREADS] = r[u];
    return;
  }
  if (aligned) {  // a partial last chunk: vectors, then the byte tail
    const uint4* s = reinterpret_cast<const uint4*>(src);
    uint4* d = reinterpret_cast<uint4*>(dst);
    const uint64_t nvec = len / 16;
    for (uint64_t i = threadIdx.x; i < nvec; i += THREADS) d[i] = s[i];
    done = nvec * 16;
  }
  for (uint64_t i = done + threadIdx.x; i < len; i += THREADS) dst[i] = src[i];
}

__global__ void __launch_bounds__(THREADS) copy_list_kernel(const CopyBatch batch) {
  const uint64_t total = batch.chunk_end[batch.n - 1];
  for (uint64_t c = blockIdx.x; c < total; c += gridDim.x) {
    const int i = entry_of(batch, c);
    const uint64_t first = i ? batch.chunk_end[i - 1] : 0;
    const uint64_t off = (c - first) * CHUNK;
    const uint64_t left = batch.e[i].nbytes - off;
    copy_chunk(static_cast<const uint8_t*>(batch.e[i].src) + off, static_cast<uint8_t*>(batch.e[i].dst) + off,
               left < CHUNK ? left : CHUNK);
  }
}

}  // namespace

extern "C" int zd_copy_list(const ZdCopy* entries, int n, int blocks, void* stream) {
  for (int start = 0; start < n; start += ZD_MAX_ENTRIES) {
    CopyBatch b;
    b.n = 0;
    uint64_t chunks = 0;
    for (int i = start; i < n && b.n < ZD_MAX_ENTRIES; ++i) {
      if (entries[i].nbytes == 0) continue;
      b.e[b.n] = entries[i];
      chunks += (entries[i].nbytes + CHUNK - 1) / CHUNK;
      b.chunk_end[b.n++] = chunks;
    }
    if (b.n == 0) continue;
    const int grid = static_cast<int>(chunks < uint64_t(blocks) ? chunks : uint64_t(blocks));
    copy_list_kernel<<<grid, THREADS, 0, static_cast<cudaStream_t>(stream)>>>(b);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

extern "C" const char* zd_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

extern "C" int zd_chunk_bytes() { return static_cast<int>(CHUNK); }
