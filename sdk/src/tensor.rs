//! Tensors across the plugin boundary.
//!
//! Host and plugins link the same libtorch, so a tensor crosses as tch's own pointer to a
//! heap-allocated `at::Tensor`; only the ownership has to be explicit:
//! - [`TensorHandle`] owns one reference and releases it when dropped (exactly once);
//! - [`TensorRef`] borrows the caller's tensor for the duration of a call and never releases it.
//!
//! Hidden from the documentation: the traits plugin authors implement take and return
//! `tch::Tensor`, and the SDK converts.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::Deref;

use abi_stable::StableAbi;
use tch::Tensor;

/// An owned tensor crossing the ABI. Dropping it releases the tensor with the deleter of the side
/// that created it.
#[repr(C)]
#[derive(StableAbi)]
pub struct TensorHandle {
    ptr: *mut c_void,
    release: extern "C" fn(*mut c_void),
}

extern "C" fn release_tensor(ptr: *mut c_void) {
    // SAFETY: `ptr` came from `TensorHandle::new`, which took ownership of a live tch tensor, and
    // a handle calls `release` at most once (in `Drop`, never after `into_tensor`).
    drop(unsafe { Tensor::from_ptr(ptr.cast()) });
}

impl TensorHandle {
    /// Takes ownership of `tensor` (a shallow handle: the storage is shared, not copied).
    pub fn new(tensor: Tensor) -> Self {
        let mut tensor = ManuallyDrop::new(tensor);
        TensorHandle {
            ptr: tensor.as_mut_ptr().cast(),
            release: release_tensor,
        }
    }

    /// Gives the tensor back as a tch tensor that now owns the reference.
    pub fn into_tensor(self) -> Tensor {
        let this = ManuallyDrop::new(self);
        // SAFETY: the handle owned a live tensor pointer and is consumed without running Drop,
        // so ownership moves to the returned Tensor exactly once.
        unsafe { Tensor::from_ptr(this.ptr.cast()) }
    }

    /// Borrows the tensor without giving up ownership.
    pub fn borrow(&self) -> TensorRef<'_> {
        TensorRef {
            ptr: self.ptr,
            _borrow: PhantomData,
        }
    }
}

impl Drop for TensorHandle {
    fn drop(&mut self) {
        (self.release)(self.ptr)
    }
}

impl From<Tensor> for TensorHandle {
    fn from(tensor: Tensor) -> Self {
        TensorHandle::new(tensor)
    }
}

impl From<&Tensor> for TensorHandle {
    /// A new reference to the same storage (autograd identity is kept).
    fn from(tensor: &Tensor) -> Self {
        TensorHandle::new(tensor.shallow_clone())
    }
}

/// A tensor borrowed for the duration of a call.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct TensorRef<'a> {
    ptr: *mut c_void,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> TensorRef<'a> {
    /// Borrows `tensor` for `'a`.
    pub fn new(tensor: &'a Tensor) -> Self {
        TensorRef {
            ptr: tensor.as_ptr() as *mut c_void,
            _borrow: PhantomData,
        }
    }

    /// A `&Tensor` view of the borrowed tensor.
    pub fn get(self) -> BorrowedTensor<'a> {
        // SAFETY: `ptr` points at a tensor that outlives 'a (it was borrowed for 'a); wrapping it
        // in ManuallyDrop means this view never releases it.
        let tensor = unsafe { Tensor::from_ptr(self.ptr.cast()) };
        BorrowedTensor {
            tensor: ManuallyDrop::new(tensor),
            _borrow: PhantomData,
        }
    }

    /// A new owned reference to the same tensor.
    pub fn to_owned(self) -> Tensor {
        self.get().shallow_clone()
    }
}

impl<'a> From<&'a Tensor> for TensorRef<'a> {
    fn from(tensor: &'a Tensor) -> Self {
        TensorRef::new(tensor)
    }
}

/// A borrowed tensor; derefs to `tch::Tensor` and never releases it.
pub struct BorrowedTensor<'a> {
    tensor: ManuallyDrop<Tensor>,
    _borrow: PhantomData<&'a Tensor>,
}

impl Deref for BorrowedTensor<'_> {
    type Target = Tensor;
    fn deref(&self) -> &Tensor {
        &self.tensor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owned_round_trip_keeps_values_and_storage() {
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]);
        let back = TensorHandle::from(&t).into_tensor();
        assert_eq!(Vec::<f32>::try_from(&back).unwrap(), vec![1.0, 2.0, 3.0]);
        // Shallow: an in-place change through one is seen through the other.
        let _ = back.shallow_clone().fill_(7.0);
        assert_eq!(t.double_value(&[0]), 7.0);
    }

    #[test]
    fn borrowed_view_does_not_release() {
        let t = Tensor::from_slice(&[5i64]);
        for _ in 0..1000 {
            let view = TensorRef::new(&t).get();
            assert_eq!(view.int64_value(&[0]), 5);
        }
        assert_eq!(t.int64_value(&[0]), 5);
    }

    fn resident_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// Every form of crossing, 100k times: a leak of one 4 KiB tensor per crossing would grow
    /// the process by ~400 MB, a double free would crash.
    #[test]
    fn hundred_thousand_round_trips_keep_memory_flat() {
        let round_trips = |n: usize| {
            for _ in 0..n {
                let t = Tensor::ones([1024], (tch::Kind::Float, tch::Device::Cpu));
                let handle = TensorHandle::from(&t);
                let view = handle.borrow().get();
                assert_eq!(view.size(), [1024]);
                let back = handle.into_tensor();
                drop(TensorHandle::new(back));
                let owned = TensorRef::new(&t).to_owned();
                drop(owned);
            }
        };
        round_trips(1_000);
        let before = resident_bytes();
        round_trips(100_000);
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown < 32 << 20,
            "resident memory grew by {} MB",
            grown >> 20
        );
    }
}
