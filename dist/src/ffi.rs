//! The shim's C ABI (csrc/c10d.cpp) and owning handles over it: the only `unsafe` of the crate.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::ptr::NonNull;

use tch::Tensor;

/// `TrellisStore` / `TrellisGroup` in the shim; only ever behind a pointer.
#[repr(C)]
pub(crate) struct RawStore {
    _opaque: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawGroup {
    _opaque: [u8; 0],
}

extern "C" {
    fn trellis_dist_tcp_store(
        host: *const c_char,
        port: u16,
        world_size: c_int,
        is_master: c_int,
        timeout_ms: i64,
        out: *mut *mut RawStore,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn trellis_dist_store_free(store: *mut RawStore);
    fn trellis_dist_gloo(
        store: *mut RawStore,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        out: *mut *mut RawGroup,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn trellis_dist_has_nccl() -> c_int;
    fn trellis_dist_nccl(
        store: *mut RawStore,
        rank: c_int,
        world_size: c_int,
        timeout_ms: i64,
        out: *mut *mut RawGroup,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn trellis_dist_group_free(group: *mut RawGroup);
    // Tensors are `at::Tensor*`, what tch's `Tensor::as_ptr` / `as_mut_ptr` point at.
    fn trellis_dist_all_reduce(
        group: *mut RawGroup,
        tensor: *mut c_void,
        op: c_int,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn trellis_dist_broadcast(
        group: *mut RawGroup,
        tensor: *mut c_void,
        root: c_int,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn trellis_dist_all_gather(
        group: *mut RawGroup,
        input: *const c_void,
        outputs: *const *mut c_void,
        outputs_len: usize,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
    fn trellis_dist_barrier(group: *mut RawGroup, error: *mut c_char, error_len: usize) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn trellis_dist_sync_batch_norm(
        group: *mut RawGroup,
        input: *const c_void,
        weight: *const c_void,
        bias: *const c_void,
        running_mean: *mut c_void,
        running_var: *mut c_void,
        momentum: f64,
        eps: f64,
        out: *mut *mut c_void,
        error: *mut c_char,
        error_len: usize,
    ) -> c_int;
}

/// Room for c10d's messages, which name both ends of a connection and the timeout.
const ERROR_LEN: usize = 4096;

/// Runs one shim call with an error buffer; a non-zero return carries the C++ exception's text.
fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), String> {
    let mut buffer = vec![0 as c_char; ERROR_LEN];
    if f(buffer.as_mut_ptr(), ERROR_LEN) == 0 {
        return Ok(());
    }
    // SAFETY: the shim writes a NUL-terminated string of at most ERROR_LEN bytes into the
    // buffer, and the buffer was zeroed, so it holds a NUL even if the shim wrote nothing.
    let message = unsafe { CStr::from_ptr(buffer.as_ptr()) };
    Err(message.to_string_lossy().into_owned())
}

fn timeout_ms(timeout: std::time::Duration) -> i64 {
    i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn has_nccl() -> bool {
    // SAFETY: takes nothing and only returns a compile-time constant.
    unsafe { trellis_dist_has_nccl() != 0 }
}

/// An owned `c10::intrusive_ptr<c10d::Store>`.
pub(crate) struct StoreHandle(NonNull<RawStore>);

// SAFETY: c10d stores are used from any thread (ProcessGroupGloo's workers use them). The handle
// is not `Sync`, so the shim's count of groups made from it (bumped through `&self`) is never
// touched by two threads at once.
unsafe impl Send for StoreHandle {}

impl StoreHandle {
    pub(crate) fn tcp(
        host: &str,
        port: u16,
        world_size: i32,
        is_master: bool,
        timeout: std::time::Duration,
    ) -> Result<StoreHandle, String> {
        let host = CString::new(host).map_err(|_| "the host name holds a NUL byte".to_string())?;
        let mut out = std::ptr::null_mut();
        call(|error, len| {
            // SAFETY: `host` is a NUL-terminated string alive for the call, `out` a valid place
            // for the new store, and `error` a buffer of `len` bytes.
            unsafe {
                trellis_dist_tcp_store(
                    host.as_ptr(),
                    port,
                    world_size,
                    c_int::from(is_master),
                    timeout_ms(timeout),
                    &mut out,
                    error,
                    len,
                )
            }
        })?;
        NonNull::new(out)
            .map(StoreHandle)
            .ok_or_else(|| "the shim returned no store".to_string())
    }
}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `trellis_dist_tcp_store` and is freed once, here. Groups
        // made from it hold their own reference to the C++ store.
        unsafe { trellis_dist_store_free(self.0.as_ptr()) }
    }
}

#[derive(Clone, Copy)]
pub(crate) enum Backend {
    Gloo,
    Nccl,
}

/// An owned process group (`c10::intrusive_ptr<c10d::Backend>` plus its rank and size).
pub(crate) struct GroupHandle(NonNull<RawGroup>);

// SAFETY: a c10d backend may be driven from any thread; it is not `Sync`, so one thread at a
// time issues collectives, which keeps their order the same on every rank.
unsafe impl Send for GroupHandle {}

impl GroupHandle {
    pub(crate) fn new(
        backend: Backend,
        store: &StoreHandle,
        rank: i32,
        world_size: i32,
        timeout: std::time::Duration,
    ) -> Result<GroupHandle, String> {
        let create = match backend {
            Backend::Gloo => trellis_dist_gloo,
            Backend::Nccl => trellis_dist_nccl,
        };
        let mut out = std::ptr::null_mut();
        call(|error, len| {
            // SAFETY: `store` is live for the call (and not `Sync`, so no other thread is creating
            // a group from it), `out` a valid place for the new group, `error` a buffer of `len`
            // bytes.
            unsafe {
                create(
                    store.0.as_ptr(),
                    rank,
                    world_size,
                    timeout_ms(timeout),
                    &mut out,
                    error,
                    len,
                )
            }
        })?;
        NonNull::new(out)
            .map(GroupHandle)
            .ok_or_else(|| "the shim returned no process group".to_string())
    }

    /// `op`: 0 sum, 1 mean.
    pub(crate) fn all_reduce(&self, tensor: &mut Tensor, op: i32) -> Result<(), String> {
        let group = self.0.as_ptr();
        let tensor = tensor.as_mut_ptr().cast::<c_void>();
        call(|error, len| {
            // SAFETY: `group` is live for `&self`; `tensor` points at the `at::Tensor` of a tch
            // tensor borrowed mutably for the call (the reduction writes into its storage).
            unsafe { trellis_dist_all_reduce(group, tensor, op, error, len) }
        })
    }

    pub(crate) fn broadcast(&self, tensor: &mut Tensor, root: i32) -> Result<(), String> {
        let group = self.0.as_ptr();
        let tensor = tensor.as_mut_ptr().cast::<c_void>();
        call(|error, len| {
            // SAFETY: as in `all_reduce`: a live group and a mutably borrowed tensor.
            unsafe { trellis_dist_broadcast(group, tensor, root, error, len) }
        })
    }

    pub(crate) fn all_gather(&self, input: &Tensor, outputs: &mut [Tensor]) -> Result<(), String> {
        let group = self.0.as_ptr();
        let input = input.as_ptr().cast::<c_void>();
        let pointers: Vec<*mut c_void> = outputs
            .iter_mut()
            .map(|output| output.as_mut_ptr().cast::<c_void>())
            .collect();
        call(|error, len| {
            // SAFETY: a live group; `input` is borrowed for the call and only read; `pointers`
            // holds `pointers.len()` tensors borrowed mutably through `outputs`, which the
            // gather writes into.
            unsafe {
                trellis_dist_all_gather(group, input, pointers.as_ptr(), pointers.len(), error, len)
            }
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn sync_batch_norm(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &mut Tensor,
        running_var: &mut Tensor,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor, String> {
        let group = self.0.as_ptr();
        let mut out: *mut c_void = std::ptr::null_mut();
        let running_mean = running_mean.as_mut_ptr().cast::<c_void>();
        let running_var = running_var.as_mut_ptr().cast::<c_void>();
        call(|error, len| {
            // SAFETY: a live group; the three inputs are borrowed for the call and only read
            // (autograd keeps its own references); the running statistics are borrowed mutably
            // and updated in place; `out` is a valid place for the new tensor.
            unsafe {
                trellis_dist_sync_batch_norm(
                    group,
                    input.as_ptr().cast(),
                    weight.as_ptr().cast(),
                    bias.as_ptr().cast(),
                    running_mean,
                    running_var,
                    momentum,
                    eps,
                    &mut out,
                    error,
                    len,
                )
            }
        })?;
        if out.is_null() {
            return Err("the shim returned no tensor".to_string());
        }
        // SAFETY: on success the shim stored a heap-allocated `at::Tensor` (`new at::Tensor`),
        // which tch takes over and frees with `delete` when the Tensor drops.
        Ok(unsafe { Tensor::from_ptr(out.cast::<torch_sys::C_tensor>()) })
    }

    pub(crate) fn barrier(&self) -> Result<(), String> {
        let group = self.0.as_ptr();
        call(|error, len| {
            // SAFETY: a live group and an error buffer of `len` bytes.
            unsafe { trellis_dist_barrier(group, error, len) }
        })
    }
}

impl Drop for GroupHandle {
    fn drop(&mut self) {
        // SAFETY: the pointer came from `trellis_dist_gloo` / `trellis_dist_nccl` and is freed
        // once, here.
        unsafe { trellis_dist_group_free(self.0.as_ptr()) }
    }
}
