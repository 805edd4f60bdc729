// MoEFFN on onnxruntime's CUDA execution provider: registration entry point.
#pragma once

#include "../ort_abi.h"

namespace moefuse {
namespace cuda {

// Adds MoEFFN for "CUDAExecutionProvider" (float32, float16, bfloat16) to `domain`.
// `shape_inference`: set the output shape callback (onnxruntime versions where it is safe).
OrtStatus* AddCudaOps(const OrtApi* api, OrtCustomOpDomain* domain, bool shape_inference);

}  // namespace cuda
}  // namespace moefuse
