"""Run megatron-core's training stack on CPU over gloo (0.16.1 to 0.19.2; only without CUDA).

megatron-core assumes CUDA in a few dozen places (each is named below with its megatron-core
file:line). This module makes exactly those places CPU-safe, in one spot, without touching how
the model computes:

1. **Per-module torch proxy.** The modules below read ``torch`` as a module global; each gets a
   proxy that forwards everything to ``torch`` except (a) tensor factories whose ``device`` is a
   CUDA device, which are remapped to CPU, and (b) ``torch.cuda``, whose ``current_device`` is the
   CPU device, ``synchronize``/``empty_cache`` are no-ops, ``current_stream`` is a stream whose
   waits are no-ops and RNG calls go to the CPU generator.
   Only these modules see the proxy; model math elsewhere runs on plain torch with no overhead.
2. **Tensor.type() strings.** ``distrib_optimizer.py:361,420,582``, ``optimizer.py:671-699`` and
   ``clip_grads.py:167`` compare ``param.type()`` with ``'torch.cuda.FloatTensor'`` etc. and raise
   for anything else; a CPU tensor's ``type()`` (no arguments) reports the CUDA name instead.
3. **.cuda() is a no-op** for tensors and modules (e.g. ``language_module.py:244`` moves tied
   embeddings with ``.cuda()`` when PP > 1).
4. **A CPU RNG tracker** replaces ``CudaRNGStatesTracker``: one real ``torch.Generator`` per
   tracker name (data-parallel, model-parallel with the TP-rank offset, expert), and ``fork(name)``
   swaps that generator's state into the global CPU generator for the duration and back out, so
   dropout and initialisation inside a fork draw from the named stream and the global stream is
   left exactly as it was. ``get_states``/``set_states`` round-trip for checkpoints.

Nothing here runs when ``torch.cuda.is_available()``: on GPU, stock megatron-core is used as is.
Sequence parallelism and the TE/apex fused paths are not made CPU-capable (they need a GPU).
"""

from __future__ import annotations

import contextlib
import importlib
import types
from typing import Any

import torch

# Modules whose module-global ``torch`` is replaced by the proxy, with the CUDA sites they hold
# (megatron/core/...:line in 0.16.1; docs/VERSIONS.md says how 0.17-0.19 were checked).
PROXIED_MODULES = (
    # param_data / grad_data buffers on torch.cuda.current_device() (:800, :806); 0.19 also
    # waits on torch.cuda.current_stream() in start_grad_sync (0.19.2 :632)
    "megatron.core.distributed.param_and_grad_buffer",
    # inv_freq.to(torch.cuda.current_device()) (:162)
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # GlobalMemoryBuffer.get_tensor (:631), local_multi_tensor_l2_norm device="cuda" (:1207)
    "megatron.core.utils",
    # dummy_overflow_buf device='cuda' (:103, :174), grad-norm tensors (:90, :115, :207)
    "megatron.core.optimizer.clip_grads",
    # _dummy_overflow_buf/_scale_one (:481, :485), FP32Optimizer._scale (:907)
    "megatron.core.optimizer.optimizer",
    # dummy state on load (:791), checkpoint gather buffers (:1077, :1089)
    "megatron.core.optimizer.distrib_optimizer",
    # total_num_tokens = torch.zeros([], device="cuda") (:596, :983, :2138)
    "megatron.core.pipeline_parallel.schedules",
    # recv buffers on current_device (:313, :321), torch.cuda.synchronize (:398)
    "megatron.core.pipeline_parallel.p2p_communication",
    # model_parallel_cuda_manual_seed: torch.cuda.manual_seed (:422)
    "megatron.core.tensor_parallel.random",
    # get_default_causal_mask: torch.ones(sq, sq, device="cuda") (:35), used by the unfused softmax
    "megatron.core.transformer.utils",
    # softmax_type offsets on current_device (:123, :132)
    "megatron.core.transformer.dot_product_attention",
    # checkpoint exchange buffers device="cuda" (:104, :110, :326)
    "megatron.core.dist_checkpointing.exchange_utils",
    # verify-reuse flags device='cuda' (:204, :252)
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    # torch.cuda.synchronize before copying tensors to the writer (:230)
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    # liveness/call-index tensors on current_device (:165, :604), synchronize (:212)
    "megatron.core.dist_checkpointing.strategies.async_utils",
    # torch.cuda.synchronize around parallel save/load (:272, :281)
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
)

_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "rand",
        "randn",
        "randint",
        "zeros_like",
        "ones_like",
        "empty_like",
        "full_like",
        "as_tensor",
        "linspace",
    }
)

_CPU = torch.device("cpu")
_ACTIVE = False


def _remap_device(device: Any) -> Any:
    if device is None:
        return None
    if isinstance(device, int):
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    return device


def _factory(fn):
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _remap_device(kwargs["device"])
        return fn(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


class _CpuStream:
    """The current "CUDA stream" on the CPU: work is already ordered, so waits are no-ops."""

    def wait_event(self, event: Any) -> None:
        return None

    def wait_stream(self, stream: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None


_CPU_STREAM = _CpuStream()


class _CudaNamespaceProxy(types.ModuleType):
    """``torch.cuda`` as seen by the proxied megatron modules on a CPU-only machine."""

    def __init__(self):
        super().__init__("torch.cuda[cpu-compat]")

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def synchronize(*args, **kwargs) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def current_stream(*args, **kwargs) -> _CpuStream:
        return _CPU_STREAM

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def get_rng_state(*args, **kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *args, **kwargs) -> None:
        torch.set_rng_state(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class _TorchProxy(types.ModuleType):
    """``torch`` for one megatron module: CUDA devices become CPU, ``torch.cuda`` is tamed."""

    def __init__(self):
        super().__init__("torch[cpu-compat]")
        self.cuda = _CudaNamespaceProxy()
        for name in _FACTORIES:
            setattr(self, name, _factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Megatron's RNG-states tracker API backed by one real CPU ``torch.Generator`` per name.

    ``fork(name)`` loads the named generator's state into the global CPU generator, runs the
    block, saves the advanced state back into the named generator and restores the global state,
    so ops inside draw from the named stream and the global stream is untouched.
    """

    def __init__(self, *args, **kwargs):
        self.reset()

    def is_initialized(self) -> bool:
        """Whether any state was added or set."""
        return self._is_initialized

    def reset(self) -> None:
        """Forget all states and seeds."""
        self._is_initialized = False
        self.generators_: dict[str, torch.Generator] = {}
        self.seeds_: set[int] = set()
        self._current = None

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every named generator state (for checkpoints)."""
        return {name: g.get_state() for name, g in self.generators_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        """Restore named states saved by :meth:`get_states`."""
        self._is_initialized = True
        self.generators_ = {}
        for name, state in states.items():
            g = torch.Generator()
            g.set_state(state)
            self.generators_[name] = g

    def add(self, name: str, seed: int) -> None:
        """Create the generator ``name`` seeded with ``seed`` (each seed and name once)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.generators_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        g = torch.Generator()
        g.manual_seed(seed)
        self.generators_[name] = g

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        """Run the block on the named generator's stream."""
        if name not in self.generators_:
            raise Exception(f"rng state {name} is not added")
        if self._current is not None:
            # Nested fork: park the outer stream's progress first.
            self.generators_[self._current].set_state(torch.get_rng_state())
        outer, outer_state = self._current, torch.get_rng_state()
        torch.set_rng_state(self.generators_[name].get_state())
        self._current = name
        try:
            yield
        finally:
            self.generators_[name].set_state(torch.get_rng_state())
            self._current = outer
            if outer is not None:
                torch.set_rng_state(self.generators_[outer].get_state())
            else:
                torch.set_rng_state(outer_state)


def _install_rng_tracker() -> None:
    random_mod = importlib.import_module("megatron.core.tensor_parallel.random")
    original_init = random_mod.initialize_rng_tracker

    def initialize_rng_tracker(*args, force_reset: bool = False, **kwargs) -> None:
        if force_reset or not isinstance(random_mod._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
            random_mod._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
            random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = True

    initialize_rng_tracker.__doc__ = original_init.__doc__
    random_mod.initialize_rng_tracker = initialize_rng_tracker
    random_mod._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


_ORIGINAL_TENSOR_TYPE = torch.Tensor.type


def _tensor_type(self, dtype=None, non_blocking=False, **kwargs):
    if dtype is None and not kwargs and self.device.type == "cpu":
        name = _ORIGINAL_TENSOR_TYPE(self)  # e.g. "torch.FloatTensor"
        return name.replace("torch.", "torch.cuda.", 1)
    return _ORIGINAL_TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _tensor_cuda(self, *args, **kwargs):
    return self


def _module_cuda(self, *args, **kwargs):
    return self


def activate_cpu_compat() -> bool:
    """Make megatron-core's training stack CPU-capable (idempotent; no-op with CUDA).

    Returns:
        True when the compatibility layer is (now) active, False on a CUDA machine.
    """
    global _ACTIVE
    if torch.cuda.is_available():
        return False
    if _ACTIVE:
        return True
    for name in PROXIED_MODULES:
        module = importlib.import_module(name)
        if getattr(module, "torch", None) is torch:
            module.torch = _TorchProxy()
    torch.Tensor.type = _tensor_type
    torch.Tensor.cuda = _tensor_cuda
    torch.nn.Module.cuda = _module_cuda
    _install_rng_tracker()
    _ACTIVE = True
    return True


def is_active() -> bool:
    """Whether :func:`activate_cpu_compat` has patched this process."""
    return _ACTIVE
