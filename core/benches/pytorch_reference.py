"""The PyTorch eager side of `cargo bench -p trellis --bench speed`.

The bench starts this script once and drives it over stdin/stdout, one JSON object per line each
way, so the two sides run alternately in the same session on the same machine. Everything here is
what a plain PyTorch user would write: kuangliu's CIFAR ResNet18 (pytorch-cifar, models/resnet.py,
with a width multiplier), `torch.optim.SGD(..., foreach=True)`, `torch.no_grad()` evaluation, and a
batched crop-and-flip augmentation in tensor ops.

`--memory` runs a short training session on its own instead and prints its peak RSS, so each
side's peak is measured in a process of its own; `--epochs N` trains whole epochs on its own (on
the CPU or a GPU) and prints each one's seconds, for the bench's `epoch` case.

Only the standard library and torch are needed: safetensors files are read and written by the
few lines below rather than by the `safetensors` package, which the torch wheel does not bring.
"""

import argparse
import copy
import json
import resource
import struct
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


# --- kuangliu/pytorch-cifar models/resnet.py (BasicBlock, ResNet18), with a width multiplier --


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(self.expansion * planes),
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, num_classes=10, width=1.0):
        super().__init__()
        # Trellis's `max(1, round(c * width))`, Python's round being half-to-even like Rust's
        # round_ties_even.
        c = lambda n: max(1, round(n * width))
        self.in_planes = c(64)
        self.conv1 = nn.Conv2d(3, c(64), kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c(64))
        self.layer1 = self._make_layer(block, c(64), num_blocks[0], stride=1)
        self.layer2 = self._make_layer(block, c(128), num_blocks[1], stride=2)
        self.layer3 = self._make_layer(block, c(256), num_blocks[2], stride=2)
        self.layer4 = self._make_layer(block, c(512), num_blocks[3], stride=2)
        self.linear = nn.Linear(c(512) * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        strides = [stride] + [1] * (num_blocks - 1)
        layers = []
        for stride in strides:
            layers.append(block(self.in_planes, planes, stride))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer1(out)
        out = self.layer2(out)
        out = self.layer3(out)
        out = self.layer4(out)
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def ResNet18(width=1.0):
    return ResNet(BasicBlock, [2, 2, 2, 2], width=width)


# --- safetensors, the subset the bench uses -----------------------------------------------------

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U8": torch.uint8}
NAMES = {v: k for k, v in DTYPES.items()}


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = DTYPES[info["dtype"]]
        t = torch.frombuffer(bytearray(body[start:end]), dtype=dtype) if end > start else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def write_safetensors(path, tensors):
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.numpy().tobytes()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


# --- the cases ----------------------------------------------------------------------------------


class Session:
    def __init__(self, channels_last, compile):
        self.model = None
        # What the timed steps and passes call: the model, or torch.compile of it.
        self.run_model = None
        self.initial_weights = None
        self.opt = None
        self.batches = []
        self.channels_last = channels_last
        self.compile = compile

    def layout(self, x):
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def load_model(self, width, weights, lr, momentum, weight_decay, batch_size):
        self.model = ResNet18(width)
        state = read_safetensors(weights)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        # Trellis's BatchNorm has no `num_batches_tracked`: with momentum set it is never read.
        missing = [m for m in missing if not m.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise ValueError(f"weights do not match: missing {missing}, unexpected {unexpected}")
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay, foreach=True
        )
        # Inputs for timing: normalised-image statistics; the values do not change the kernels.
        g = torch.Generator().manual_seed(0)
        self.batches = [
            (self.layout(torch.randn(batch_size, 3, 32, 32, generator=g)), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(4)
        ]
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.run_model = torch.compile(self.model) if self.compile else self.model
        self.initial_weights = None
        return {"parameters": sum(p.numel() for p in self.model.parameters())}

    def step(self, x, y, autocast=False, phases=None):
        """One training step; appends [forward+loss, zero_grad+backward, optimizer] seconds to
        `phases` when given (zero_grad is counted with backward, as on Trellis's side)."""
        started = time.perf_counter()
        # As PyTorch's AMP recipe has it: forward and loss under autocast, backward outside.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(self.run_model(x), y)
        forward = time.perf_counter()
        self.opt.zero_grad()
        loss.backward()
        backward = time.perf_counter()
        self.opt.step()
        if phases is not None:
            phases.append([forward - started, backward - forward, time.perf_counter() - backward])
        return loss

    def check_train(self, inputs, out, channels_last):
        """Logits of a training-mode forward, then one SGD step; writes both for comparison.

        Runs on a copy of the model, in the memory format Trellis used, so that the comparison
        checks the model and the update rule to the last bits rather than two kernels' rounding.
        """
        batch = read_safetensors(inputs)
        model = copy.deepcopy(self.model)
        x, y = batch["inputs"], batch["targets"]
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), **{k: v for k, v in self.opt.defaults.items() if k in ("lr", "momentum", "weight_decay", "foreach")})
        model.train()
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        opt.step()
        result = {"logits": logits, "loss": loss.reshape(1)}
        for name, t in model.state_dict().items():
            if not name.endswith("num_batches_tracked"):
                result[name] = t
        write_safetensors(out, result)
        return {}

    def time_train(self, steps, autocast=False):
        self.model.train()
        times = []
        phases = []
        total = torch.zeros((), dtype=torch.float64)
        before = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(steps):
            x, y = self.batches[i % len(self.batches)]
            started = time.perf_counter()
            loss = self.step(x, y, autocast, phases)
            # Accumulated as a tensor, like Trellis's loop, rather than read each step.
            total += loss.detach().double() * x.shape[0]
            times.append(time.perf_counter() - started)
        after = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "seconds": times,
            "phases": phases,
            "loss_sum": total.item(),
            "user_seconds": after.ru_utime - before.ru_utime,
            "system_seconds": after.ru_stime - before.ru_stime,
            "minor_faults": after.ru_minflt - before.ru_minflt,
        }

    def prepare_optimizer(self):
        """Gradients for every parameter, and one step so the momentum buffers exist."""
        self.model.train()
        x, y = self.batches[0]
        self.step(x, y)
        self.opt.zero_grad(set_to_none=False)
        F.cross_entropy(self.model(x), y).backward()
        return {}

    def time_optimizer(self, steps):
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            self.opt.step()
            times.append(time.perf_counter() - started)
        return {"seconds": times}

    def time_prune_magnitude(self, density):
        """Global magnitude pruning as Synaptic-Flow's Mag pruner does it: |w| of every conv and
        linear weight, one threshold by kthvalue over all of them, masks 0 where the score is <=
        the threshold and 1 elsewhere, applied in place. Every call prunes the weights as loaded,
        as pruning at initialisation does."""
        layers = (nn.Conv2d, nn.Linear)
        weights = [m.weight for m in self.model.modules() if isinstance(m, layers)]
        if self.initial_weights is None:
            self.initial_weights = [w.detach().clone() for w in weights]
        with torch.no_grad():
            for w, w0 in zip(weights, self.initial_weights):
                w.copy_(w0)
        started = time.perf_counter()
        with torch.no_grad():
            scores = [w.detach().abs() for w in weights]
            every = torch.cat([torch.flatten(s) for s in scores])
            k = int((1.0 - density) * every.numel())
            threshold, _ = torch.kthvalue(every, k)
            zero, one = torch.tensor([0.0]), torch.tensor([1.0])
            for w, s in zip(weights, scores):
                w.mul_(torch.where(s <= threshold, zero, one))
        return {"seconds": [time.perf_counter() - started]}

    def time_eval(self, images, batch_size):
        """One no-grad pass over `images` inputs, in batches; returns its seconds."""
        self.model.eval()
        g = torch.Generator().manual_seed(1)
        data = torch.randn(images, 3, 32, 32, generator=g)
        started = time.perf_counter()
        with torch.no_grad():
            correct = torch.zeros((), dtype=torch.int64)
            for i in range(0, images, batch_size):
                logits = self.run_model(self.layout(data[i : i + batch_size]))
                correct += logits.argmax(1).eq(0).sum()
        seconds = time.perf_counter() - started
        return {"seconds": [seconds], "checksum": correct.item()}

    def time_augment(self, images, batch_size, batches):
        """Random crop (pad 4) + horizontal flip + normalise of u8 CIFAR batches, on one thread."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            g = torch.Generator().manual_seed(2)
            data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, generator=g)
            mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
            std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
            b_idx = torch.arange(batch_size).view(-1, 1, 1, 1)
            c_idx = torch.arange(3).view(1, 3, 1, 1)
            ys = torch.arange(32)
            xs = torch.arange(32)
            order = torch.randperm(images, generator=g)
            started = time.perf_counter()
            checksum = 0.0
            for i in range(batches):
                start = (i * batch_size) % (images - batch_size + 1)
                idx = order[start : start + batch_size]
                x = F.pad(data[idx], (4, 4, 4, 4))
                dy = torch.randint(0, 9, (batch_size,), generator=g)
                dx = torch.randint(0, 9, (batch_size,), generator=g)
                flip = torch.rand(batch_size, generator=g) < 0.5
                rows = (dy.view(-1, 1) + ys).view(batch_size, 1, 32, 1)
                cols = (torch.where(flip.view(-1, 1), 31 - xs, xs) + dx.view(-1, 1)).view(batch_size, 1, 1, 32)
                out = (x[b_idx, c_idx, rows, cols].float() / 255 - mean) / std
                checksum += float(out[0, 0, 0, 0])
            seconds = time.perf_counter() - started
        finally:
            torch.set_num_threads(threads)
        return {"seconds": [seconds / batches], "checksum": checksum}


def peak_rss_kb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def serve(channels_last, compile):
    session = Session(channels_last, compile)
    for line in sys.stdin:
        request = json.loads(line)
        command = request.pop("cmd")
        if command == "quit":
            break
        try:
            reply = getattr(session, command)(**request)
            reply["ok"] = True
        except Exception as e:  # reported to the bench, which stops with the message
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


def memory(width, steps, batch_size, channels_last):
    model = ResNet18(width)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)
    model.train()
    x = torch.randn(batch_size, 3, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    print(json.dumps({"peak_rss_kb": peak_rss_kb()}), flush=True)


def augment_on_device(images, mean, std, generator):
    """Random crop (pad 4) + horizontal flip + normalise of a u8 batch, where the batch is."""
    b, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (b,), device=device, generator=generator)
    dx = torch.randint(0, 9, (b,), device=device, generator=generator)
    flip = torch.rand(b, device=device, generator=generator) < 0.5
    ys = torch.arange(h, device=device)
    xs = torch.arange(w, device=device)
    rows = (dy.view(-1, 1) + ys).view(b, 1, h, 1)
    cols = (torch.where(flip.view(-1, 1), w - 1 - xs, xs) + dx.view(-1, 1)).view(b, 1, 1, w)
    batch = torch.arange(b, device=device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=device).view(1, c, 1, 1)
    return (padded[batch, channel, rows, cols].float() / 255 - mean) / std


def epochs(device, width, images, epochs, batch_size, channels_last, compile):
    """`epochs` training epochs over `images` random CIFAR-shaped u8 images, the strongest plain
    PyTorch set-up for the device: the whole set resident there, shuffled and augmented there in
    batched tensor ops, SGD with foreach, the loss summed on the device and read once per epoch.
    Prints each epoch's training seconds (the device synchronised before each clock reading); with
    torch.compile the first epoch includes the compilation."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    model = ResNet18(width).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, foreach=True)
    run_model = torch.compile(model) if compile else model
    g = torch.Generator(device=device).manual_seed(0)
    data = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    labels = torch.randint(0, 10, (images,), device=device, generator=g)
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device).view(1, 3, 1, 1)
    model.train()
    seconds = []
    for _ in range(epochs):
        sync()
        started = time.perf_counter()
        order = torch.randperm(images, device=device, generator=g)
        total = torch.zeros((), dtype=torch.float64, device=device)
        for i in range(images // batch_size):
            idx = order[i * batch_size : (i + 1) * batch_size]
            x = augment_on_device(data[idx], mean, std, g)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx]
            opt.zero_grad()
            loss = F.cross_entropy(run_model(x), y)
            loss.backward()
            opt.step()
            total += loss.detach().double() * batch_size
        loss_sum = total.item()
        sync()
        seconds.append(time.perf_counter() - started)
        if loss_sum != loss_sum:
            raise ValueError("NaN loss")
    print(json.dumps({"train_seconds": seconds}), flush=True)


def compile_error():
    """None where torch.compile runs here; otherwise why not (inductor on the CPU needs a C++
    compiler and Python's headers)."""
    try:
        torch.compile(lambda x: torch.relu(x) + 1)(torch.ones(8))
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--interop-threads", type=int, required=True)
    parser.add_argument("--memory", action="store_true", help="one training session, then print the peak RSS")
    parser.add_argument("--epochs", type=int, help="train this many epochs on its own, then print their seconds")
    parser.add_argument("--device", default="cpu", help="--epochs only: cpu or cuda")
    parser.add_argument("--images", type=int, default=50000, help="--epochs only: training set size")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--channels-last", action="store_true", help="model and inputs in torch.channels_last, as Trellis runs on the CPU"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile (inductor) the model")
    args = parser.parse_args()
    # Before any parallel work, as PyTorch requires for the inter-op pool.
    torch.set_num_interop_threads(args.interop_threads)
    torch.set_num_threads(args.threads)
    if args.epochs:
        epochs(args.device, args.width, args.images, args.epochs, args.batch_size, args.channels_last, args.compile)
    elif args.memory:
        memory(args.width, args.steps, args.batch_size, args.channels_last)
    else:
        hello = {"ok": True, "torch": torch.__version__, "threads": torch.get_num_threads()}
        if args.compile:
            hello["compile_error"] = compile_error()
        print(json.dumps(hello), flush=True)
        serve(args.channels_last, args.compile)


if __name__ == "__main__":
    main()
