// A C ABI over torch.distributed's c10d: a TCPStore rendezvous, Gloo and NCCL process groups, and
// the few collectives data-parallel training needs. Tensors arrive as `at::Tensor*`, what tch's
// `Tensor::as_ptr` / `as_mut_ptr` point at.
//
// Every entry point catches C++ exceptions and reports them as a message: an exception crossing
// into Rust would abort the process, and a dead peer or a timeout must be an error the caller can
// act on (exit naming the rank, resume from a checkpoint), not a crash.

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/custom_function.h>
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

void all_reduce_sum(TrellisGroup* group, at::Tensor& tensor) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> tensors{tensor};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::SUM;
  finish(group->backend->allreduce(tensors, options));
}

// Batch normalisation over the batch of every rank, as PyTorch's SyncBatchNorm: the statistics
// are those of the global batch, and so is the gradient. Forward: each rank's count, mean and
// sum of squared deviations per channel (two passes, for accuracy) are gathered and combined in
// float64 (Chan et al.'s parallel variance). Backward: the per-channel sums of dy and dy·(x − μ)
// are all-reduced, so every rank's input gradient is its rows of the global batch's gradient.
// The parameters' own gradients stay local: the trainer all-reduces those with the others.
struct SyncBatchNorm : public torch::autograd::Function<SyncBatchNorm> {
  static std::vector<int64_t> reduced_dims(const at::Tensor& input) {
    std::vector<int64_t> dims{0};
    for (int64_t d = 2; d < input.dim(); ++d) dims.push_back(d);
    return dims;
  }

  static std::vector<int64_t> channel_view(const at::Tensor& input) {
    std::vector<int64_t> shape(input.dim(), 1);
    shape[1] = input.size(1);
    return shape;
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& input,
                            const at::Tensor& weight, const at::Tensor& bias,
                            at::Tensor running_mean, at::Tensor running_var, double momentum,
                            double eps, int64_t group_address) {
    auto* group = reinterpret_cast<TrellisGroup*>(group_address);
    TORCH_CHECK(input.dim() >= 2, "batch norm needs a [B, C, ...] input, got ", input.sizes());
    auto dims = reduced_dims(input);
    auto view = channel_view(input);
    int64_t channels = input.size(1);
    double count = static_cast<double>(input.numel() / std::max<int64_t>(channels, 1));
    // Sums accumulate in float64 (as libtorch's CPU batch norm does): over a batch of images
    // they add tens of thousands of terms, and float32 would cost the gradients digits.
    auto local_mean = at::sum(input, dims, false, at::kDouble) / count;
    auto local_m2 =
        at::sum((input - local_mean.to(input.scalar_type()).view(view)).square(), dims, false,
                at::kDouble);
    auto stats = at::cat({at::full({1}, count, local_mean.options()), local_mean, local_m2});
    std::vector<at::Tensor> inputs{stats};
    std::vector<at::Tensor> gathered;
    for (int i = 0; i < group->size; ++i) gathered.push_back(at::empty_like(stats));
    std::vector<std::vector<at::Tensor>> outputs{gathered};
    finish(group->backend->allgather(outputs, inputs));
    auto all = at::stack(outputs[0]);  // [world, 1 + 2C]
    auto counts = all.narrow(1, 0, 1);
    auto means = all.narrow(1, 1, channels);
    auto m2s = all.narrow(1, 1 + channels, channels);
    auto total = counts.sum();
    auto mean = (means * counts).sum(0) / total;
    auto m2 = m2s.sum(0) + ((means - mean).square() * counts).sum(0);
    auto var = m2 / total;
    double n = total.item<double>();
    TORCH_CHECK(n > 1, "batch norm in training needs more than one value per channel");
    {
      at::NoGradGuard no_grad;
      running_mean.mul_(1 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
      running_var.mul_(1 - momentum)
          .add_((var * (n / (n - 1))).to(running_var.scalar_type()), momentum);
    }
    auto mean_f = mean.to(input.scalar_type());
    auto invstd = (var + eps).rsqrt().to(input.scalar_type());
    ctx->save_for_backward({input, weight, mean_f, invstd});
    ctx->saved_data["group"] = group_address;
    ctx->saved_data["count"] = n;
    return (input - mean_f.view(view)) * (invstd * weight).view(view) + bias.view(view);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto input = saved[0], weight = saved[1], mean = saved[2], invstd = saved[3];
    auto* group = reinterpret_cast<TrellisGroup*>(ctx->saved_data["group"].toInt());
    double n = ctx->saved_data["count"].toDouble();
    auto dy = grads[0];
    auto dims = reduced_dims(input);
    auto view = channel_view(input);
    int64_t channels = input.size(1);
    auto xmu = input - mean.view(view);
    auto sum_dy = at::sum(dy, dims, false, at::kDouble);
    auto sum_dy_xmu = at::sum(dy * xmu, dims, false, at::kDouble);
    auto grad_weight = (sum_dy_xmu * invstd.to(at::kDouble)).to(weight.scalar_type());
    auto grad_bias = sum_dy.to(weight.scalar_type());
    auto sums = at::cat({sum_dy, sum_dy_xmu});
    all_reduce_sum(group, sums);
    auto mean_dy = (sums.narrow(0, 0, channels) / n).to(dy.scalar_type());
    auto mean_dy_xmu = (sums.narrow(0, channels, channels) / n).to(dy.scalar_type());
    auto grad_input = (dy - mean_dy.view(view) -
                       xmu * (invstd.square() * mean_dy_xmu).view(view)) *
                      (invstd * weight).view(view);
    return {grad_input, grad_weight, grad_bias, at::Tensor(), at::Tensor(),
            at::Tensor(),  at::Tensor(),  at::Tensor()};
  }
};

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

// The output of batch normalisation over the global batch (SyncBatchNorm above), with autograd;
// updates the running statistics in place.
int trellis_dist_sync_batch_norm(TrellisGroup* group, const at::Tensor* input,
                                 const at::Tensor* weight, const at::Tensor* bias,
                                 at::Tensor* running_mean, at::Tensor* running_var,
                                 double momentum, double eps, at::Tensor** out, char* error,
                                 size_t error_len) {
  return guarded(
      [&] {
        auto output = SyncBatchNorm::apply(*input, *weight, *bias, *running_mean, *running_var,
                                           momentum, eps, reinterpret_cast<int64_t>(group));
        *out = new at::Tensor(std::move(output));
      },
      error, error_len);
}

int trellis_dist_barrier(TrellisGroup* group, char* error, size_t error_len) {
  return guarded([&] { finish(group->backend->barrier()); }, error, error_len);
}

}  // extern "C"
