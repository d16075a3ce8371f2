// A C ABI over torch.distributed's c10d: a TCPStore rendezvous, Gloo and NCCL process groups, and
// the few collectives data-parallel training needs. Tensors arrive as `at::Tensor*`, what tch's
// `Tensor::as_ptr` / `as_mut_ptr` point at.
//
// Every entry point catches C++ exceptions and reports them as a message: an exception crossing
// into Rust would abort the process, and a dead peer or a timeout must be an error the caller can
// act on (exit naming the rank, resume from a checkpoint), not a crash.

#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#include <torch/csrc/distributed/c10d/Work.hpp>

#ifdef TRELLIS_DIST_NCCL
#include <ATen/cuda/CUDAContextLight.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <sstream>
#include <string>
#include <vector>

struct TrellisStore {
  c10::intrusive_ptr<c10d::Store> store;
  // Groups made from one store get their own key prefix, as torch.distributed does for its
  // groups: two groups on one store would otherwise read each other's rendezvous keys. Every rank
  // creates its groups in the same order, so the n-th group has the same prefix everywhere.
  uint64_t groups = 0;
};

struct TrellisGroup {
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank;
  int size;
  // NCCL averages natively; Gloo has no AVG, so a mean there is a sum divided afterwards.
  bool native_avg;
};

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

std::chrono::milliseconds millis(int64_t ms) { return std::chrono::milliseconds(ms); }

c10::intrusive_ptr<c10d::Store> group_store(TrellisStore* store) {
  std::ostringstream prefix;
  prefix << "trellis_pg/" << store->groups++;
  return c10::make_intrusive<c10d::PrefixStore>(prefix.str(), store->store);
}

// Raises the error of a failed collective on this thread. Waiting without a bound cannot hang on
// a silent peer: Gloo enforces the group's timeout inside each transfer, and NCCL (with the
// blocking wait set up in trellis_dist_nccl) raises past it in wait().
void finish(const c10::intrusive_ptr<c10d::Work>& work) { work->wait(); }

}  // namespace

// The collectives run under no-grad (Gloo's workers inherit the caller's thread-local state): they
// write into parameters that require grad (a broadcast from rank 0) and are no part of the graph.

extern "C" {

int trellis_dist_tcp_store(const char* host, uint16_t port, int world_size, int is_master,
                           int64_t timeout_ms, TrellisStore** out, char* error,
                           size_t error_len) {
  return guarded(
      [&] {
        c10d::TCPStoreOptions options;
        options.port = port;
        options.isServer = is_master != 0;
        options.numWorkers = static_cast<size_t>(world_size);
        options.waitWorkers = true;
        options.timeout = millis(timeout_ms);
        auto store = c10::make_intrusive<c10d::TCPStore>(std::string(host), options);
        *out = new TrellisStore{std::move(store)};
      },
      error, error_len);
}

void trellis_dist_store_free(TrellisStore* store) { delete store; }

int trellis_dist_gloo(TrellisStore* store, int rank, int world_size, int64_t timeout_ms,
                      TrellisGroup** out, char* error, size_t error_len) {
  return guarded(
      [&] {
        auto options = c10d::ProcessGroupGloo::Options::create(millis(timeout_ms));
        // As torch.distributed picks them: the interfaces GLOO_SOCKET_IFNAME names, else this
        // host's address (loopback when the hostname does not resolve).
        bool lazy = c10d::getDefaultGlooLazyInit();
        const char* interfaces = std::getenv("GLOO_SOCKET_IFNAME");
        if (interfaces != nullptr && interfaces[0] != '\0') {
          std::stringstream names(interfaces);
          std::string name;
          while (std::getline(names, name, ',')) {
            if (!name.empty()) {
              options->devices.push_back(
                  c10d::ProcessGroupGloo::createDeviceForInterface(name, lazy));
            }
          }
        }
        if (options->devices.empty()) {
          options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice(lazy));
        }
        options->threads = static_cast<int>(options->devices.size()) * 2;
        auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(group_store(store), rank,
                                                                   world_size, options);
        *out = new TrellisGroup{std::move(backend), rank, world_size, false};
      },
      error, error_len);
}

int trellis_dist_has_nccl() {
#ifdef TRELLIS_DIST_NCCL
  return 1;
#else
  return 0;
#endif
}

int trellis_dist_nccl(TrellisStore* store, int rank, int world_size, int64_t timeout_ms,
                      TrellisGroup** out, char* error, size_t error_len) {
  return guarded(
      [&] {
#ifdef TRELLIS_DIST_NCCL
        TORCH_CHECK(at::cuda::is_available(),
                    "the NCCL backend needs a CUDA device and none is available");
        // ProcessGroupNCCL reads these when it is constructed. Without them a timeout is
        // handled by its watchdog thread, which tears the process down; with them the waiting
        // call raises instead. A value the user set is kept.
        setenv("TORCH_NCCL_BLOCKING_WAIT", "1", 0);
        setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", 0);
        setenv("TORCH_NCCL_ENABLE_MONITORING", "0", 0);
        auto options = c10d::ProcessGroupNCCL::Options::create();
        options->timeout = millis(timeout_ms);
        auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(group_store(store), rank,
                                                                   world_size, options);
        *out = new TrellisGroup{std::move(backend), rank, world_size, true};
#else
        (void)store;
        (void)rank;
        (void)world_size;
        (void)timeout_ms;
        (void)out;
        TORCH_CHECK(false,
                    "trellis-dist was built without NCCL: its libtorch has no libtorch_cuda, or "
                    "the CUDA headers were missing (./scripts/setup.sh installs them)");
#endif
      },
      error, error_len);
}

void trellis_dist_group_free(TrellisGroup* group) { delete group; }

// op: 0 sum, 1 mean.
int trellis_dist_all_reduce(TrellisGroup* group, at::Tensor* tensor, int op, char* error,
                            size_t error_len) {
  return guarded(
      [&] {
        at::NoGradGuard no_grad;
        TORCH_CHECK(op == 0 || op == 1, "unknown reduce op ", op);
        std::vector<at::Tensor> tensors{*tensor};
        c10d::AllreduceOptions options;
        bool mean = op == 1;
        options.reduceOp = mean && group->native_avg ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
        finish(group->backend->allreduce(tensors, options));
        if (mean && !group->native_avg) tensor->div_(group->size);
      },
      error, error_len);
}

int trellis_dist_broadcast(TrellisGroup* group, at::Tensor* tensor, int root, char* error,
                           size_t error_len) {
  return guarded(
      [&] {
        at::NoGradGuard no_grad;
        std::vector<at::Tensor> tensors{*tensor};
        c10d::BroadcastOptions options;
        options.rootRank = root;
        finish(group->backend->broadcast(tensors, options));
      },
      error, error_len);
}

// `outputs` holds world-size tensors shaped like `input`, filled in rank order.
int trellis_dist_all_gather(TrellisGroup* group, const at::Tensor* input, at::Tensor** outputs,
                            size_t outputs_len, char* error, size_t error_len) {
  return guarded(
      [&] {
        at::NoGradGuard no_grad;
        TORCH_CHECK(outputs_len == static_cast<size_t>(group->size), "all_gather needs ",
                    group->size, " output tensors, got ", outputs_len);
        std::vector<at::Tensor> gathered;
        gathered.reserve(outputs_len);
        for (size_t i = 0; i < outputs_len; ++i) gathered.push_back(*outputs[i]);
        std::vector<std::vector<at::Tensor>> output_lists{std::move(gathered)};
        std::vector<at::Tensor> inputs{*input};
        finish(group->backend->allgather(output_lists, inputs));
      },
      error, error_len);
}

int trellis_dist_barrier(TrellisGroup* group, char* error, size_t error_len) {
  return guarded([&] { finish(group->backend->barrier()); }, error, error_len);
}

}  // extern "C"
