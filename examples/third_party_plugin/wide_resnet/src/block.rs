//! The pre-activation basic block of WideResNet, as the reference PyTorch implementation
//! (xternalz/WideResNet-pytorch) writes it:
//!
//! ```text
//! BN → ReLU → conv3×3 (stride) → BN → ReLU → [dropout] → conv3×3  +  shortcut
//! ```
//!
//! When the block keeps the shape the shortcut is the identity of the block's input; when it
//! changes width or resolution it is a 1×1 convolution (`convShortcut`) of the *pre-activated*
//! input, which both branches then share.

use tch::Tensor;
use trellis_sdk::Result;

use crate::layers::{BatchNorm2d, Conv2d};
use crate::registry::Registry;

pub(crate) struct BasicBlock {
    bn1: BatchNorm2d,
    conv1: Conv2d,
    bn2: BatchNorm2d,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    dropout: f64,
}

impl BasicBlock {
    /// Registers the block's tensors under `module` (e.g. `block2.layer.0`) in PyTorch's order:
    /// bn1, conv1, bn2, conv2, convShortcut.
    pub fn new(
        r: &mut Registry,
        module: &str,
        cin: i64,
        cout: i64,
        stride: i64,
        dropout: f64,
    ) -> Result<BasicBlock> {
        let bn1 = r.batch_norm2d(&format!("{module}.bn1"), cin)?;
        let conv1 = r.conv2d(&format!("{module}.conv1"), cin, cout, 3, stride)?;
        let bn2 = r.batch_norm2d(&format!("{module}.bn2"), cout)?;
        let conv2 = r.conv2d(&format!("{module}.conv2"), cout, cout, 3, 1)?;
        // The reference tests `in_planes == out_planes` alone; WideResNet's strided blocks all
        // change width, so checking the stride too only guards shapes it never builds.
        let shortcut = if cin == cout && stride == 1 {
            None
        } else {
            Some(r.conv2d(&format!("{module}.convShortcut"), cin, cout, 1, stride)?)
        };
        Ok(BasicBlock {
            bn1,
            conv1,
            bn2,
            conv2,
            shortcut,
            dropout,
        })
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        let pre = self.bn1.forward(x, train)?.f_relu()?;
        let out = self.conv1.forward(&pre)?;
        let mut out = self.bn2.forward(&out, train)?.f_relu()?;
        if self.dropout > 0.0 {
            out = out.f_dropout(self.dropout, train)?;
        }
        let out = self.conv2.forward(&out)?;
        let shortcut = match &self.shortcut {
            Some(conv) => conv.forward(&pre)?,
            None => x.shallow_clone(),
        };
        Ok(out.f_add(&shortcut)?)
    }
}
