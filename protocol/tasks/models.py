"""The torch side of the task specs: one small model per vetted family (protocol.tasks.spec.ModelFamily), the loss
and the metrics of each task kind. A spec picks a family and its hyperparameters; nothing else can be built here.

Imported only by code that trains or evaluates (ClientApp, ServerApp evaluation, benchmarks): it imports torch.
`build_model` is deterministic for a seed, so device and coordinator can start from the same weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
import torch
from torch import nn
from torch.optim.adam import adam

from protocol.errors import MalformedError
from protocol.tasks.spec import ModelFamily, TaskKind, TaskSpec

NDArrays = dict[str, npt.NDArray[np.generic]]


class ApplianceClassifier(nn.Module):
    """Two 1-D convolutions over (channels, length) and a linear head; about 4k parameters for PLAID."""

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        h = spec.hidden
        self.features = nn.Sequential(
            nn.Conv1d(spec.channels, h // 2, kernel_size=7, stride=2, padding=3),
            nn.ReLU(),
            nn.Conv1d(h // 2, h, kernel_size=5, stride=2, padding=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool1d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(h * 4 + spec.channels, len(spec.labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Appliance currents span three orders of magnitude: the convolutions see the waveform's shape at unit
        # RMS and the head gets the log-RMS level separately, which trains far better than raw amperes.
        rms = x.pow(2).mean(dim=2, keepdim=True).sqrt() + 1e-3
        shape = self.features(x / rms)
        return self.head(torch.cat([shape, rms.log().flatten(1)], dim=1))  # type: ignore[no-any-return]


class WindowMLP(nn.Module):
    """One dense hidden layer over the flattened window and a linear head over the classes."""

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(spec.channels * spec.window_length, spec.hidden),
            nn.ReLU(),
            nn.Linear(spec.hidden, len(spec.labels)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


class NextStepForecaster(nn.Module):
    """A GRU over the window; predicts the next sample of every channel."""

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        self.gru = nn.GRU(spec.channels, spec.hidden, batch_first=True)
        self.head = nn.Linear(spec.hidden, spec.channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, last = self.gru(x.transpose(1, 2))
        return self.head(last[-1])  # type: ignore[no-any-return]


class WindowAutoencoder(nn.Module):
    """A dense bottleneck autoencoder over the flattened window."""

    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        size = spec.channels * spec.window_length
        bottleneck = max(2, spec.hidden // 4)
        self.encoder = nn.Sequential(
            nn.Flatten(), nn.Linear(size, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, bottleneck)
        )
        self.decoder = nn.Sequential(nn.Linear(bottleneck, spec.hidden), nn.ReLU(), nn.Linear(spec.hidden, size))
        self.shape = (spec.channels, spec.window_length)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x)).view(-1, *self.shape)  # type: ignore[no-any-return]


_MODELS: dict[ModelFamily, type[nn.Module]] = {
    ModelFamily.CONV1D_CLASSIFIER: ApplianceClassifier,
    ModelFamily.MLP_CLASSIFIER: WindowMLP,
    ModelFamily.GRU_FORECASTER: NextStepForecaster,
    ModelFamily.DENSE_AUTOENCODER: WindowAutoencoder,
}


def build_model(spec: TaskSpec, seed: int = 0) -> nn.Module:
    """The task's model with weights drawn from `seed`, identical on every machine for the same seed."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return _MODELS[spec.model.family](spec)
    finally:
        torch.random.set_rng_state(generator_state)


def model_arrays(model: nn.Module) -> NDArrays:
    """The model's state as named numpy arrays (copies), in state_dict order."""
    return {name: t.detach().cpu().numpy().copy() for name, t in model.state_dict().items()}


def load_arrays(model: nn.Module, arrays: Mapping[str, npt.NDArray[np.generic]]) -> None:
    """Load named arrays into the model; names, shapes and dtypes must match exactly."""
    state = model.state_dict()
    if set(arrays) != set(state):
        raise MalformedError(
            "arrays do not name the model's parameters",
            missing=sorted(set(state) - set(arrays))[:8],
            unexpected=sorted(set(arrays) - set(state))[:8],
        )
    for name, tensor in state.items():
        value = np.asarray(arrays[name])
        if tuple(value.shape) != tuple(tensor.shape):
            raise MalformedError("array shape mismatch", name=name, expected=tuple(tensor.shape), found=value.shape)
    model.load_state_dict({name: torch.from_numpy(np.array(arrays[name], copy=True)) for name in state})


def check_batch(spec: TaskSpec, x: npt.NDArray[np.generic], y: npt.NDArray[np.generic] | None) -> None:
    """Windows must be shaped (n, channels, window_length), with one target per window where the kind needs one."""
    if x.ndim != 3 or x.shape[1:] != (spec.channels, spec.window_length):
        raise MalformedError(
            "windows have the wrong shape", expected=("n", spec.channels, spec.window_length), found=x.shape
        )
    if spec.kind is TaskKind.AUTOENCODER:
        return
    if y is None or len(y) != len(x):
        raise MalformedError(
            "targets missing or not one per window", windows=len(x), targets=None if y is None else len(y)
        )
    if spec.kind is TaskKind.CLASSIFICATION and len(y) and (int(y.min()) < 0 or int(y.max()) >= len(spec.labels)):
        raise MalformedError("label index out of range", labels=len(spec.labels), found=(int(y.min()), int(y.max())))
    if spec.kind is TaskKind.FORECAST and y.shape[1:] != (spec.channels,):
        raise MalformedError("forecast targets have the wrong shape", expected=("n", spec.channels), found=y.shape)


def to_tensors(
    spec: TaskSpec, x: npt.NDArray[np.generic], y: npt.NDArray[np.generic] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    check_batch(spec, x, y)
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if spec.kind is TaskKind.AUTOENCODER or y is None:
        return xt, xt
    if spec.kind is TaskKind.CLASSIFICATION:
        return xt, torch.as_tensor(np.asarray(y, dtype=np.int64))
    return xt, torch.as_tensor(np.asarray(y, dtype=np.float32))


def loss_fn(spec: TaskSpec, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if spec.kind is TaskKind.CLASSIFICATION:
        return nn.functional.cross_entropy(outputs, targets)
    return nn.functional.mse_loss(outputs, targets)


@torch.no_grad()
def evaluate(
    spec: TaskSpec,
    model: nn.Module,
    x: npt.NDArray[np.generic],
    y: npt.NDArray[np.generic] | None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Mean loss over the windows, plus accuracy (classification) or mean absolute error (the others)."""
    xt, yt = to_tensors(spec, x, y)
    if len(xt) == 0:
        raise MalformedError("no windows to evaluate")
    model.eval()
    loss_sum, score_sum = 0.0, 0.0
    for start in range(0, len(xt), batch_size):
        xb, yb = xt[start : start + batch_size], yt[start : start + batch_size]
        out = model(xb)
        loss_sum += float(loss_fn(spec, out, yb)) * len(xb)
        if spec.kind is TaskKind.CLASSIFICATION:
            score_sum += float((out.argmax(dim=1) == yb).sum())
        else:
            score_sum += float((out - yb).abs().mean()) * len(xb)
    metric = "accuracy" if spec.kind is TaskKind.CLASSIFICATION else "mae"
    return {"loss": loss_sum / len(xt), metric: score_sum / len(xt)}


def train_epochs(
    spec: TaskSpec,
    model: nn.Module,
    x: npt.NDArray[np.generic],
    y: npt.NDArray[np.generic] | None,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    gradient_offset: Mapping[str, npt.NDArray[np.generic]] | None = None,
) -> None:
    """Plain minibatch Adam, fresh at `lr`, for `epochs` passes shuffled from `seed` so a round is reproducible.

    `gradient_offset` (named like the model's parameters) is added to every minibatch gradient before the Adam step:
    the drift correction of protocol.tasks.drift. None trains without it.
    """
    xt, yt = to_tensors(spec, x, y)
    if len(xt) == 0:
        raise MalformedError("no windows to train on")
    offsets = parameter_offsets(model, gradient_offset) if gradient_offset is not None else []
    optimiser = PlainAdam(model.parameters(), lr=lr)
    model.train()
    for batch in minibatches(len(xt), epochs, batch_size, seed):
        train_step(spec, model, optimiser, xt[batch], yt[batch], offsets)


def minibatches(count: int, epochs: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The index batches of `epochs` passes over `count` windows, each pass in an order drawn from one generator
    seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for start in range(0, count, batch_size):
            yield order[start : start + batch_size]


class Optimiser(Protocol):
    """What train_step needs of an optimiser: PlainAdam, or any torch.optim.Optimizer (the bench's kept-state Adam)."""

    def zero_grad(self) -> None: ...

    def step(self) -> object: ...


class PlainAdam:
    """torch.optim.Adam with its defaults (betas 0.9 / 0.999, eps 1e-8, no weight decay, one tensor at a time as on
    the CPU), the same update bit for bit, through torch's functional `torch.optim.adam.adam`.

    Why not torch.optim.Adam itself: building any torch.optim.Optimizer imports torch._dynamo and with it sympy
    (`add_param_group` is wrapped in torch._disable_dynamo, which imports dynamo at its first call): about 70 MB of
    anonymous memory and 800 modules in every process that trains, a quarter of what a Raspberry Pi hub may spend on
    a job (BENCHMARKS.md, "Device during a job"), for a compiler no round uses."""

    def __init__(self, params: Iterable[nn.Parameter], lr: float) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr = lr
        self.exp_avgs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.steps = [torch.tensor(0.0) for _ in self.params]

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every parameter that has a gradient (as torch.optim.Adam, the others keep their state)."""
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        adam(
            [self.params[i] for i in live],
            [self.params[i].grad for i in live],  # type: ignore[misc]
            [self.exp_avgs[i] for i in live],
            [self.exp_avg_sqs[i] for i in live],
            [],
            [self.steps[i] for i in live],
            foreach=False,
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=False,
            decoupled_weight_decay=False,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=self.lr,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )


def train_step(
    spec: TaskSpec,
    model: nn.Module,
    optimiser: Optimiser,
    x: torch.Tensor,
    y: torch.Tensor,
    offsets: Sequence[tuple[nn.Parameter, torch.Tensor]] = (),
) -> None:
    """One optimiser step on one minibatch, each parameter's gradient plus its offset (`parameter_offsets`)."""
    optimiser.zero_grad()
    loss_fn(spec, model(x), y).backward()  # type: ignore[no-untyped-call]
    for param, offset in offsets:
        if param.grad is not None:
            param.grad.add_(offset)
    optimiser.step()


def parameter_offsets(
    model: nn.Module, offset: Mapping[str, npt.NDArray[np.generic]]
) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """Pairs each trainable parameter with its offset. The offset names exactly the model's state (as the global
    model's arrays do, so the coordinator screens it like an update); entries of buffers, which do not train, are
    ignored."""
    state = model.state_dict()
    if set(offset) != set(state):
        raise MalformedError(
            "gradient offset does not name the model's arrays",
            missing=sorted(set(state) - set(offset))[:8],
            unexpected=sorted(set(offset) - set(state))[:8],
        )
    pairs = []
    for name, param in model.named_parameters():
        value = np.asarray(offset[name])
        if tuple(value.shape) != tuple(param.shape):
            raise MalformedError(
                "gradient offset shape mismatch", name=name, expected=tuple(param.shape), found=value.shape
            )
        pairs.append((param, torch.as_tensor(np.asarray(value, dtype=np.float32))))
    return pairs


def full_gradient(
    spec: TaskSpec, model: nn.Module, x: npt.NDArray[np.generic], y: npt.NDArray[np.generic] | None
) -> NDArrays:
    """The gradient of the mean loss over all the windows at the model's current weights, named like the model's
    arrays (`model_arrays`), float32; zeros for buffers, which do not train. The model's weights are unchanged."""
    xt, yt = to_tensors(spec, x, y)
    if len(xt) == 0:
        raise MalformedError("no windows to take a gradient on")
    model.train()
    model.zero_grad()
    loss_fn(spec, model(xt), yt).backward()  # type: ignore[no-untyped-call]
    params = dict(model.named_parameters())
    grads: NDArrays = {}
    for name, tensor in model.state_dict().items():
        grad = params[name].grad if name in params else None
        grads[name] = (grad if grad is not None else torch.zeros_like(tensor)).detach().cpu().numpy().astype(np.float32)
    model.zero_grad()
    return grads
