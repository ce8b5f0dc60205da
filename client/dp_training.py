"""Local training of one round: DP-SGD through Opacus, or plain SGD for non-private baselines.

The trained module is whatever carries the trainable parameters: the linear head on cached
features (head-only mode) or the whole ``TextClassifier`` with LoRA adapters. Batches are
tuples ``(*inputs, labels)`` and the module is called as ``module(*inputs)``.
"""

from __future__ import annotations

import itertools
import math
import secrets
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from client.label_scope import ScopedHead
from client.privacy import PrivacyPlan
from shared.accounting import Mechanism


@dataclass(frozen=True)
class TrainResult:
    mean_loss: float
    steps: int


def _optimizer(module: nn.Module, *, learning_rate: float, momentum: float) -> torch.optim.Optimizer:
    trainable = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.SGD(trainable, lr=learning_rate, momentum=momentum)


def train_private(
    *, module: nn.Module, dataset: Dataset, plan: PrivacyPlan, prior: list[Mechanism],
    batch_size: int, local_epochs: int, learning_rate: float, momentum: float, max_grad_norm: float,
    public_batch: int | None = None, noise_shares: int = 1,
) -> TrainResult:
    """One round of DP-SGD: Poisson sampling (expected batch ``batch_size``), per-sample clipping to
    ``max_grad_norm``, Gaussian noise.

    ``public_batch``: the noisy clipped sum is divided by this run-wide public number (the run's
    batch-size) rather than by the department's own expected batch, so every department's update
    carries the same noise, lr x sigma x max_grad_norm / public_batch, and its signal grows with
    the records it samples: a small department sampling a quarter of its records moves the model
    by its share, not by a mean as noisy as its batch is small. None: Opacus' own expected batch.

    ``noise_shares`` > 1 (distributed noise, needs ``public_batch``): the round is the plan's single
    step, with ``1 / sqrt(noise_shares)`` of the plan's noise: the SecAgg+ sum of that many
    departments' updates is then one DP-SGD step over their records with the plan's whole noise,
    each record's contribution bounded by ``learning_rate x max_grad_norm / public_batch``.
    """
    if noise_shares > 1 and public_batch is None:
        raise ValueError("distributed noise divides by the run's public batch: pass public_batch")
    from opacus import PrivacyEngine

    # torch's default generator starts from the same seed in every process: sampling and noise
    # get generators seeded from the OS's entropy instead, fresh each round.
    sampling_rng, noise_rng = (torch.Generator().manual_seed(secrets.randbits(63)) for _ in range(2))
    applied_noise = plan.noise_multiplier / math.sqrt(noise_shares)
    loader = _loader(dataset, batch_size=batch_size, shuffle=False, generator=sampling_rng)
    module.train()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Secure RNG turned off.*")
        engine = PrivacyEngine(accountant=plan.accountant)
        engine.accountant.history = list(prior)
        # The head on cached features (a Linear, or the rows of one) uses ghost clipping: per-sample
        # gradient norms without materialising per-sample gradients. Anything else (LoRA inside the
        # Transformer) uses hooks mode. tests/test_per_sample_grads.py checks both against a per-example loop.
        ghost = isinstance(module, (nn.Linear, ScopedHead))
        made = engine.make_private(
            module=module,
            optimizer=_optimizer(module, learning_rate=learning_rate, momentum=momentum),
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=applied_noise,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise_rng,
            grad_sample_mode="ghost" if ghost else "hooks",
        )
    dp_module, optimizer, criterion, dp_loader = made if ghost else (made[0], made[1], nn.CrossEntropyLoss(), made[2])
    if abs(dp_loader.sample_rate - plan.sample_rate) > 1e-12:
        raise RuntimeError(f"Opacus sampling rate {dp_loader.sample_rate} differs from the plan's {plan.sample_rate}")
    if public_batch is not None:
        optimizer.expected_batch_size = public_batch  # Opacus divides the noisy sum by it
    try:
        mean_loss, steps = _run_epochs(dp_module, optimizer, dp_loader, local_epochs, criterion,
                                       empty_batch=None if ghost else _no_samples, max_steps=plan.steps_per_round)
    finally:
        dp_module._close()  # remove Opacus hooks so the module can be reused next round
    mechanism = (applied_noise, plan.sample_rate)
    counted = _steps_of(engine.accountant.history, mechanism) - _steps_of(prior, mechanism)
    if steps != plan.steps_per_round or counted != plan.steps_per_round:
        raise RuntimeError(f"ran {steps} DP steps and Opacus counted {counted}; the privacy plan accounted for "
                           f"{plan.steps_per_round}")
    return TrainResult(mean_loss, steps)


def _steps_of(history: list[Mechanism], mechanism: tuple[float, float]) -> int:
    """Steps of (noise multiplier, sampling rate) in an Opacus accountant history (it merges repeats of one mechanism)."""
    return sum(n for sigma, q, n in history if (sigma, q) == mechanism)


def train_plain(
    *, module: nn.Module, dataset: Dataset, batch_size: int, local_epochs: int,
    learning_rate: float, momentum: float, seed: int,
) -> TrainResult:
    """Non-private baseline: shuffled mini-batches, no clipping, no noise, no guarantee."""
    generator = torch.Generator().manual_seed(seed)
    loader = _loader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = _optimizer(module, learning_rate=learning_rate, momentum=momentum)
    mean_loss, steps = _run_epochs(module, optimizer, loader, local_epochs, nn.CrossEntropyLoss())
    return TrainResult(mean_loss, steps)


class _WholeBatchDataset(TensorDataset):
    """A TensorDataset that the DataLoader fetches a batch from with one indexing per tensor.

    DataLoader otherwise fetches item by item and stacks them: on cached features that was a
    third of a DP-SGD step (profiled with cProfile; fedpriv bench's DP overhead table).
    """

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return [tensor[index] for tensor in self.tensors]


def _already_batched(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch


def _loader(dataset: Dataset, *, batch_size: int, shuffle: bool, generator: torch.Generator) -> DataLoader:
    if isinstance(dataset, TensorDataset):
        return DataLoader(_WholeBatchDataset(*dataset.tensors), batch_size=batch_size, shuffle=shuffle,
                          generator=generator, collate_fn=_already_batched)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def _no_samples(module: nn.Module) -> None:
    """Zero per-sample gradients for an empty batch, as Opacus' hooks would record (Opacus then adds noise only).

    A Transformer cannot run a forward pass on zero sequences (transformers reshapes fail), so an
    empty Poisson batch of the LoRA model never reaches it.
    """
    for parameter in module.parameters():
        if parameter.requires_grad:
            setattr(parameter, "grad_sample", torch.zeros((0, *parameter.shape), dtype=parameter.dtype))  # Opacus' attribute


def _run_epochs(
    module: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, epochs: int, criterion: Callable,
    empty_batch: Callable[[nn.Module], None] | None = None, max_steps: int | None = None,
) -> tuple[float, int]:
    module.train()
    loss_sum, loss_count, steps = 0.0, 0, 0
    # each epoch's batches drawn only when reached: a stop after max_steps samples nothing more
    batches = itertools.chain.from_iterable(loader for _ in range(epochs))
    for batch in itertools.islice(batches, max_steps):
        *inputs, labels = batch
        optimizer.zero_grad(set_to_none=True)
        # An empty Poisson batch still takes its (noise-only) step: skipping it would change the
        # mechanism that the accountant counts. The head runs it (zero-sized sums); a Transformer cannot.
        if len(labels) == 0 and empty_batch is not None:
            empty_batch(module)
            optimizer.step()
            steps += 1
            continue
        logits = module(*inputs)
        criterion(logits, labels).backward()
        optimizer.step()
        loss_sum += nn.functional.cross_entropy(logits.detach(), labels, reduction="sum").item()
        loss_count += len(labels)
        steps += 1
    module.eval()
    return (loss_sum / loss_count if loss_count else float("nan")), steps
