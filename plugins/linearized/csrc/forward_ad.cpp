// Forward-mode AD entry points that libtorch exports but tch does not wrap: entering and leaving
// a dual level, and attaching a tangent to an existing tensor in place (a model's parameter, which
// the model keeps using, so `_make_dual`'s new view would not reach it).
//
// Every function catches C++ exceptions and reports them as a message: an exception crossing
// into Rust would abort the process.

#include <ATen/core/Tensor.h>
#include <torch/csrc/autograd/forward_grad.h>

#include <cstdint>
#include <cstring>
#include <exception>

namespace {

void write_error(const char* message, char* error, size_t error_len) {
  if (error == nullptr || error_len == 0) return;
  std::strncpy(error, message, error_len - 1);
  error[error_len - 1] = '\0';
}

template <typename F>
int guarded(F body, char* error, size_t error_len) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    write_error(e.what_without_backtrace(), error, error_len);
  } catch (const std::exception& e) {
    write_error(e.what(), error, error_len);
  } catch (...) {
    write_error("unknown C++ exception", error, error_len);
  }
  return 1;
}

}  // namespace

extern "C" {

int trellis_enter_dual_level(uint64_t* level, char* error, size_t error_len) {
  return guarded([&] { *level = torch::autograd::ForwardADLevel::get_next_idx(); }, error,
                 error_len);
}

int trellis_exit_dual_level(uint64_t level, char* error, size_t error_len) {
  return guarded([&] { torch::autograd::ForwardADLevel::release_idx(level); }, error, error_len);
}

int trellis_set_tangent(const at::Tensor* primal, const at::Tensor* tangent, uint64_t level,
                        char* error, size_t error_len) {
  return guarded([&] { primal->_set_fw_grad(*tangent, level, /*is_inplace_op=*/false); }, error,
                 error_len);
}

}  // extern "C"
