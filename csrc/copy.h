// C ABI of the copy kernels in copy.cu (python_api.cpp binds it; ctypes could too).
#pragma once
#include <stdint.h>

#define ZD_MAX_ENTRIES 64  // entries per launch; the batch travels as a kernel parameter (< 4 KiB)

#ifdef __cplusplus
extern "C" {
#endif

typedef struct {
  const void* src;  // any device pointer readable from the launching device (local or peer)
  void* dst;        // any device pointer writable from the launching device
  uint64_t nbytes;
} ZdCopy;

// Copy every entry on `stream` (a cudaStream_t) of the current device, with at most `blocks` CTAs per
// launch (one launch per 64 entries). Returns a cudaError_t; 0 on success.
int zd_copy_list(const ZdCopy* entries, int n, int blocks, void* stream);
const char* zd_error_string(int err);
int zd_chunk_bytes(void);

#ifdef __cplusplus
}
#endif
