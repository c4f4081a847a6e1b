// Host side of the last-block reductions (ksl::cuda::last_block_arrived in compat.cuh): the counter
// the blocks draw their tickets from. Included by the .cu files only.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>

#include <map>
#include <mutex>
#include <utility>

namespace ksl {
namespace cuda {

// The kernel's last block sets the counter back to 0, and launches on one stream run one after
// another, so one counter per stream, zeroed once when it is first needed, serves every later call of
// every op without a fill launch; concurrent streams each get their own. While the stream is being
// captured into a CUDA graph the counter is a fresh zeroed tensor instead (a memset node of the
// graph), so a graph replayed on any stream never shares a counter with eager calls. The map is never
// destroyed: its tensors must not be freed after the CUDA context at exit. (An inline function: the
// three .cu files share one map.)
inline at::Tensor ticket_counter(const c10::Device& device) {
  const auto options = at::TensorOptions().device(device).dtype(at::kInt);
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) {
    return at::zeros({1}, options);
  }
  static std::mutex mutex;
  static auto* counters = new std::map<std::pair<c10::DeviceIndex, c10::StreamId>, at::Tensor>();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& counter = (*counters)[{stream.device_index(), stream.id()}];
  if (!counter.defined()) counter = at::zeros({1}, options);  // on this stream: ordered before the kernel
  return counter;
}

inline unsigned int* ticket_ptr(at::Tensor& counter) {
  return reinterpret_cast<unsigned int*>(counter.mutable_data_ptr<int>());
}

}  // namespace cuda
}  // namespace ksl
