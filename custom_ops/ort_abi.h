// moefuse: the part of onnxruntime's C ABI that this library uses, declared by hand.
//
// No package we can install ships onnxruntime's C headers, so the library declares what it
// needs itself. onnxruntime's C ABI is versioned and append-only: OrtApi is a table of function
// pointers whose order never changes between releases, and OrtApiBase::GetApi(version) hands out
// the table of a given version. We ask for MOEFUSE_ORT_API_VERSION (20 = onnxruntime 1.20, the
// oldest release we support) and declare the table only up to the last slot we call; slots we do
// not call are untyped placeholders. The slot numbers below are positions in that table
// (0-based) and are checked at compile time.
#pragma once

#include <cstddef>
#include <cstdint>

#define MOEFUSE_ORT_API_VERSION 20u

#if defined(_WIN32)
#define MOEFUSE_ORT_CALL __stdcall
#define MOEFUSE_EXPORT __declspec(dllexport)
#else
#define MOEFUSE_ORT_CALL
#define MOEFUSE_EXPORT __attribute__((visibility("default")))
#endif

extern "C" {

// Opaque handles owned by onnxruntime.
struct OrtStatus;
struct OrtValue;
struct OrtTypeInfo;
struct OrtTensorTypeAndShapeInfo;
struct OrtSessionOptions;
struct OrtCustomOpDomain;
struct OrtKernelInfo;
struct OrtKernelContext;
struct OrtShapeInferContext;
struct OrtMemoryInfo;

// An allocator handed out by onnxruntime (the CUDA kernel uses the EP's device allocator). Only
// the leading members, present in every version, are declared.
struct OrtAllocator {
  uint32_t version;
  void*(MOEFUSE_ORT_CALL* Alloc)(OrtAllocator* self, size_t size);
  void(MOEFUSE_ORT_CALL* Free)(OrtAllocator* self, void* p);
  const OrtMemoryInfo*(MOEFUSE_ORT_CALL* Info)(const OrtAllocator* self);
};

// Element types (the values of ONNX's TensorProto.DataType).
enum ONNXTensorElementDataType : int {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_DOUBLE = 11,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
};

enum OrtErrorCode : int {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_RUNTIME_EXCEPTION = 6,
  ORT_NOT_IMPLEMENTED = 9,
  ORT_INVALID_GRAPH = 10,
};

enum OrtCustomOpInputOutputCharacteristic : int {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
};

enum OrtMemType : int {
  OrtMemTypeDefault = 0,
};

struct OrtApi;

struct OrtApiBase {
  const OrtApi*(MOEFUSE_ORT_CALL* GetApi)(uint32_t version);
  const char*(MOEFUSE_ORT_CALL* GetVersionString)(void);
};

typedef OrtStatus* OrtStatusPtr;

// Declares `count` untyped slots; `first` is the slot number of the first one (for reading).
#define MOEFUSE_ORT_SLOTS(first, count) void* unused_from_##first[count]

struct OrtApi {
  /* 0 */ OrtStatus*(MOEFUSE_ORT_CALL* CreateStatus)(OrtErrorCode code, const char* msg);
  /* 1 */ OrtErrorCode(MOEFUSE_ORT_CALL* GetErrorCode)(const OrtStatus* status);
  /* 2 */ const char*(MOEFUSE_ORT_CALL* GetErrorMessage)(const OrtStatus* status);
  MOEFUSE_ORT_SLOTS(3, 23);
  /* 26 */ OrtStatusPtr(MOEFUSE_ORT_CALL* CreateCustomOpDomain)(const char* domain,
                                                                OrtCustomOpDomain** out);
  /* 27 */ OrtStatusPtr(MOEFUSE_ORT_CALL* CustomOpDomain_Add)(OrtCustomOpDomain* domain,
                                                              const struct OrtCustomOp* op);
  /* 28 */ OrtStatusPtr(MOEFUSE_ORT_CALL* AddCustomOpDomain)(OrtSessionOptions* options,
                                                             OrtCustomOpDomain* domain);
  MOEFUSE_ORT_SLOTS(29, 22);
  /* 51 */ OrtStatusPtr(MOEFUSE_ORT_CALL* GetTensorMutableData)(OrtValue* value, void** out);
  MOEFUSE_ORT_SLOTS(52, 3);
  /* 55 */ OrtStatusPtr(MOEFUSE_ORT_CALL* CastTypeInfoToTensorInfo)(
      const OrtTypeInfo* type_info, const OrtTensorTypeAndShapeInfo** out);
  MOEFUSE_ORT_SLOTS(56, 4);
  /* 60 */ OrtStatusPtr(MOEFUSE_ORT_CALL* GetTensorElementType)(const OrtTensorTypeAndShapeInfo* info,
                                                                ONNXTensorElementDataType* out);
  /* 61 */ OrtStatusPtr(MOEFUSE_ORT_CALL* GetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info,
                                                              size_t* out);
  /* 62 */ OrtStatusPtr(MOEFUSE_ORT_CALL* GetDimensions)(const OrtTensorTypeAndShapeInfo* info,
                                                         int64_t* dims, size_t dims_length);
  MOEFUSE_ORT_SLOTS(63, 1);
  /* 64 */ OrtStatusPtr(MOEFUSE_ORT_CALL* GetTensorShapeElementCount)(
      const OrtTensorTypeAndShapeInfo* info, size_t* out);
  /* 65 */ OrtStatusPtr(MOEFUSE_ORT_CALL* GetTensorTypeAndShape)(const OrtValue* value,
                                                                 OrtTensorTypeAndShapeInfo** out);
  MOEFUSE_ORT_SLOTS(66, 19);
  /* 85 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfoGetAttribute_float)(const OrtKernelInfo* info,
                                                                        const char* name, float* out);
  /* 86 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfoGetAttribute_int64)(const OrtKernelInfo* info,
                                                                        const char* name,
                                                                        int64_t* out);
  /* 87 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfoGetAttribute_string)(const OrtKernelInfo* info,
                                                                         const char* name, char* out,
                                                                         size_t* size);
  /* 88 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelContext_GetInputCount)(const OrtKernelContext* ctx,
                                                                       size_t* out);
  MOEFUSE_ORT_SLOTS(89, 1);
  /* 90 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelContext_GetInput)(const OrtKernelContext* ctx,
                                                                  size_t index, const OrtValue** out);
  /* 91 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelContext_GetOutput)(OrtKernelContext* ctx, size_t index,
                                                                   const int64_t* dims, size_t dim_count,
                                                                   OrtValue** out);
  MOEFUSE_ORT_SLOTS(92, 1);
  /* 93 */ void(MOEFUSE_ORT_CALL* ReleaseStatus)(OrtStatus* status);
  MOEFUSE_ORT_SLOTS(94, 4);
  /* 98 */ void(MOEFUSE_ORT_CALL* ReleaseTypeInfo)(OrtTypeInfo* info);
  /* 99 */ void(MOEFUSE_ORT_CALL* ReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);
  MOEFUSE_ORT_SLOTS(100, 32);
  /* 132 */ void(MOEFUSE_ORT_CALL* ReleaseAllocator)(OrtAllocator* allocator);
  MOEFUSE_ORT_SLOTS(133, 29);
  /* 162 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfoGetAttributeArray_float)(const OrtKernelInfo* info,
                                                                             const char* name, float* out,
                                                                             size_t* size);
  /* 163 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfoGetAttributeArray_int64)(const OrtKernelInfo* info,
                                                                             const char* name, int64_t* out,
                                                                             size_t* size);
  MOEFUSE_ORT_SLOTS(164, 29);
  /* 193 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelContext_GetGPUComputeStream)(const OrtKernelContext* ctx,
                                                                            void** out);
  MOEFUSE_ORT_SLOTS(194, 36);
  /* 230 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfo_GetInputCount)(const OrtKernelInfo* info,
                                                                     size_t* out);
  MOEFUSE_ORT_SLOTS(231, 1);
  /* 232 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfo_GetInputName)(const OrtKernelInfo* info,
                                                                    size_t index, char* out,
                                                                    size_t* size);
  MOEFUSE_ORT_SLOTS(233, 1);
  /* 234 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfo_GetInputTypeInfo)(const OrtKernelInfo* info,
                                                                        size_t index,
                                                                        OrtTypeInfo** out);
  MOEFUSE_ORT_SLOTS(235, 9);
  /* 244 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfo_GetNodeName)(const OrtKernelInfo* info, char* out,
                                                                   size_t* size);
  MOEFUSE_ORT_SLOTS(245, 4);
  /* 249 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfoGetConstantInput_tensor)(
      const OrtKernelInfo* info, size_t index, int* is_constant, const OrtValue** out);
  MOEFUSE_ORT_SLOTS(250, 3);
  /* 253 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelContext_GetAllocator)(const OrtKernelContext* ctx,
                                                                       const OrtMemoryInfo* mem_info,
                                                                       OrtAllocator** out);
  MOEFUSE_ORT_SLOTS(254, 13);
  /* 267 */ OrtStatusPtr(MOEFUSE_ORT_CALL* ShapeInferContext_GetInputCount)(
      const OrtShapeInferContext* ctx, size_t* out);
  /* 268 */ OrtStatusPtr(MOEFUSE_ORT_CALL* ShapeInferContext_GetInputTypeShape)(
      const OrtShapeInferContext* ctx, size_t index, OrtTensorTypeAndShapeInfo** out);
  MOEFUSE_ORT_SLOTS(269, 1);
  /* 270 */ OrtStatusPtr(MOEFUSE_ORT_CALL* ShapeInferContext_SetOutputTypeShape)(
      const OrtShapeInferContext* ctx, size_t index, const OrtTensorTypeAndShapeInfo* info);
  MOEFUSE_ORT_SLOTS(271, 3);
  /* 274 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelContext_ParallelFor)(const OrtKernelContext* ctx,
                                                                      void (*fn)(void*, size_t),
                                                                      size_t total, size_t num_batch,
                                                                      void* user_data);
  MOEFUSE_ORT_SLOTS(275, 2);
  /* 277 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelContext_GetScratchBuffer)(const OrtKernelContext* ctx,
                                                                           const OrtMemoryInfo* mem_info,
                                                                           size_t bytes, void** out);
  /* 278 */ OrtStatusPtr(MOEFUSE_ORT_CALL* KernelInfoGetAllocator)(const OrtKernelInfo* info,
                                                                  OrtMemType mem_type,
                                                                  OrtAllocator** out);
  // Later slots are not used (nor declared).
};

#undef MOEFUSE_ORT_SLOTS

// A custom operator as onnxruntime sees it: a version number followed by callbacks. Every field
// up to `GetEndVersion` exists in onnxruntime >= 1.17; fields after `version`'s era are ignored
// by onnxruntime when `version` is older than the release that added them.
struct OrtCustomOp {
  uint32_t version;
  void*(MOEFUSE_ORT_CALL* CreateKernel)(const OrtCustomOp* op, const OrtApi* api,
                                        const OrtKernelInfo* info);
  const char*(MOEFUSE_ORT_CALL* GetName)(const OrtCustomOp* op);
  const char*(MOEFUSE_ORT_CALL* GetExecutionProviderType)(const OrtCustomOp* op);
  ONNXTensorElementDataType(MOEFUSE_ORT_CALL* GetInputType)(const OrtCustomOp* op, size_t index);
  size_t(MOEFUSE_ORT_CALL* GetInputTypeCount)(const OrtCustomOp* op);
  ONNXTensorElementDataType(MOEFUSE_ORT_CALL* GetOutputType)(const OrtCustomOp* op, size_t index);
  size_t(MOEFUSE_ORT_CALL* GetOutputTypeCount)(const OrtCustomOp* op);
  void(MOEFUSE_ORT_CALL* KernelCompute)(void* kernel, OrtKernelContext* ctx);
  void(MOEFUSE_ORT_CALL* KernelDestroy)(void* kernel);
  OrtCustomOpInputOutputCharacteristic(MOEFUSE_ORT_CALL* GetInputCharacteristic)(const OrtCustomOp* op,
                                                                                 size_t index);
  OrtCustomOpInputOutputCharacteristic(MOEFUSE_ORT_CALL* GetOutputCharacteristic)(const OrtCustomOp* op,
                                                                                  size_t index);
  OrtMemType(MOEFUSE_ORT_CALL* GetInputMemoryType)(const OrtCustomOp* op, size_t index);
  int(MOEFUSE_ORT_CALL* GetVariadicInputMinArity)(const OrtCustomOp* op);
  int(MOEFUSE_ORT_CALL* GetVariadicInputHomogeneity)(const OrtCustomOp* op);
  int(MOEFUSE_ORT_CALL* GetVariadicOutputMinArity)(const OrtCustomOp* op);
  int(MOEFUSE_ORT_CALL* GetVariadicOutputHomogeneity)(const OrtCustomOp* op);
  OrtStatusPtr(MOEFUSE_ORT_CALL* CreateKernelV2)(const OrtCustomOp* op, const OrtApi* api,
                                                 const OrtKernelInfo* info, void** kernel);
  OrtStatusPtr(MOEFUSE_ORT_CALL* KernelComputeV2)(void* kernel, OrtKernelContext* ctx);
  OrtStatusPtr(MOEFUSE_ORT_CALL* InferOutputShapeFn)(const OrtCustomOp* op, OrtShapeInferContext* ctx);
  int(MOEFUSE_ORT_CALL* GetStartVersion)(const OrtCustomOp* op);
  int(MOEFUSE_ORT_CALL* GetEndVersion)(const OrtCustomOp* op);
  size_t(MOEFUSE_ORT_CALL* GetMayInplace)(int** input_index, int** output_index);
  void(MOEFUSE_ORT_CALL* ReleaseMayInplace)(int* input_index, int* output_index);
  size_t(MOEFUSE_ORT_CALL* GetAliasMap)(int** input_index, int** output_index);
  void(MOEFUSE_ORT_CALL* ReleaseAliasMap)(int* input_index, int* output_index);
};

}  // extern "C"

// The table positions we rely on.
#define MOEFUSE_ORT_SLOT_AT(member, slot) \
  static_assert(offsetof(OrtApi, member) == (slot) * sizeof(void*), "OrtApi slot of " #member)
MOEFUSE_ORT_SLOT_AT(CreateStatus, 0);
MOEFUSE_ORT_SLOT_AT(GetErrorMessage, 2);
MOEFUSE_ORT_SLOT_AT(CreateCustomOpDomain, 26);
MOEFUSE_ORT_SLOT_AT(AddCustomOpDomain, 28);
MOEFUSE_ORT_SLOT_AT(GetTensorMutableData, 51);
MOEFUSE_ORT_SLOT_AT(CastTypeInfoToTensorInfo, 55);
MOEFUSE_ORT_SLOT_AT(GetTensorElementType, 60);
MOEFUSE_ORT_SLOT_AT(GetDimensions, 62);
MOEFUSE_ORT_SLOT_AT(GetTensorShapeElementCount, 64);
MOEFUSE_ORT_SLOT_AT(GetTensorTypeAndShape, 65);
MOEFUSE_ORT_SLOT_AT(KernelInfoGetAttribute_float, 85);
MOEFUSE_ORT_SLOT_AT(KernelInfoGetAttribute_string, 87);
MOEFUSE_ORT_SLOT_AT(KernelContext_GetInput, 90);
MOEFUSE_ORT_SLOT_AT(KernelContext_GetOutput, 91);
MOEFUSE_ORT_SLOT_AT(ReleaseStatus, 93);
MOEFUSE_ORT_SLOT_AT(ReleaseTypeInfo, 98);
MOEFUSE_ORT_SLOT_AT(ReleaseTensorTypeAndShapeInfo, 99);
MOEFUSE_ORT_SLOT_AT(KernelInfo_GetInputCount, 230);
MOEFUSE_ORT_SLOT_AT(KernelInfo_GetInputName, 232);
MOEFUSE_ORT_SLOT_AT(KernelInfo_GetInputTypeInfo, 234);
MOEFUSE_ORT_SLOT_AT(KernelInfo_GetNodeName, 244);
MOEFUSE_ORT_SLOT_AT(KernelInfoGetConstantInput_tensor, 249);
MOEFUSE_ORT_SLOT_AT(ShapeInferContext_GetInputCount, 267);
MOEFUSE_ORT_SLOT_AT(ShapeInferContext_GetInputTypeShape, 268);
MOEFUSE_ORT_SLOT_AT(ShapeInferContext_SetOutputTypeShape, 270);
MOEFUSE_ORT_SLOT_AT(KernelContext_ParallelFor, 274);
MOEFUSE_ORT_SLOT_AT(ReleaseAllocator, 132);
MOEFUSE_ORT_SLOT_AT(KernelInfoGetAttributeArray_float, 162);
MOEFUSE_ORT_SLOT_AT(KernelInfoGetAttributeArray_int64, 163);
MOEFUSE_ORT_SLOT_AT(KernelContext_GetGPUComputeStream, 193);
MOEFUSE_ORT_SLOT_AT(KernelInfoGetAllocator, 278);
MOEFUSE_ORT_SLOT_AT(KernelContext_GetAllocator, 253);
MOEFUSE_ORT_SLOT_AT(KernelContext_GetScratchBuffer, 277);
#undef MOEFUSE_ORT_SLOT_AT
