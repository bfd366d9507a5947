"""Bytes a real megatron-core decoder layer keeps for backward, measured.

:class:`SavedTensorRecorder` installs ``torch.autograd.graph.saved_tensors_hooks`` and
records every tensor autograd saves. What counts is what is still held when the forward
ends: a tensor saved by a graph that was dropped during the forward (full recomputation
runs the layer's bias-dropout-add under ``enable_grad`` inside a no-grad checkpoint, and
that graph is discarded) holds no memory, so only saved tensors whose graph is alive are
counted, once per storage (views of one buffer share it). Parameters and the tensors
shared by every layer of a step (attention mask, rotary frequencies) are excluded.

:func:`measure_decoder_layer` builds one decoder layer as megatron-core builds it (a
``TransformerBlock`` of one layer from the GPT block spec, the local implementation) and
runs one micro-batch forward. It needs ``initialize_model_parallel`` done by the caller and
works on any device; on the CPU megatron-core needs a few shims for its CUDA assumptions
(see ``tests/megatron_cpu.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from uniap_megatron.space.strategy import Strategy
from uniap_megatron.spec.model import ModelSpec, PositionEmbedding


@dataclass(frozen=True)
class SavedTensor:
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    """Bytes of the whole storage the saved tensor lives in."""
    tag: object = None
    """What the recorder's ``tag`` callback said of it when it was saved."""


class _Held:
    """What the pack hook hands to autograd: it lives exactly as long as the saved slot."""

    __slots__ = ("tensor", "tag", "__weakref__")

    def __init__(self, tensor: torch.Tensor, tag: object = None) -> None:
        self.tensor = tensor
        self.tag = tag


class SavedTensorRecorder:
    """Context manager; after the forward, :meth:`held` lists what backward still needs.
    ``tag``, called on each tensor as it is saved, labels it (the profiler asks, at that
    moment, which module is saving it)."""

    def __init__(
        self, exclude: Iterable[torch.Tensor] = (), tag: Callable[[torch.Tensor], object] | None = None
    ) -> None:
        self._exclude = {_storage(t) for t in exclude}
        self._tag = tag
        self._held: list[weakref.ref] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Held:
        held = _Held(tensor, self._tag(tensor) if self._tag else None)
        self._held.append(weakref.ref(held))
        return held

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def __enter__(self) -> SavedTensorRecorder:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    def held(self) -> list[SavedTensor]:
        """Saved tensors still referenced by a live graph, one per storage, in save order."""
        out, seen = [], set(self._exclude)
        for ref in self._held:
            held = ref()
            if held is None:
                continue
            t = held.tensor
            key = _storage(t)
            if key in seen:
                continue
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            out.append(SavedTensor(tuple(t.shape), str(t.dtype).removeprefix("torch."), nbytes, held.tag))
        return out

    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.held())


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def measure_decoder_layer(
    model: ModelSpec, strategy: Strategy, *, mbs: int, seq: int, device: str | torch.device = "cpu", seed: int = 1234
) -> list[SavedTensor]:
    """Saved tensors of one decoder layer of ``model`` under ``strategy``'s tp and
    recomputation, for one micro-batch of ``mbs`` sequences of ``seq`` tokens (bf16)."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.transformer_block import TransformerBlock

    from uniap_megatron.validate.core_config import transformer_config

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        model_parallel_cuda_manual_seed(seed)  # the CUDA RNG tracker's streams (dropout)
    one = model.replace(num_layers=1, moe_layer_freq=model.moe_layer_freq if isinstance(model.moe_layer_freq, int) else 1)
    s = strategy.replace(pp=1, vpp=1)
    if s.recompute.value == "full":
        s = s.replace(recompute_method="uniform", recompute_num_layers=1)
    config = transformer_config(one, s, "", initialize=True)
    config.transformer_impl = "local"
    spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization=one.normalization.value)
    block = TransformerBlock(config, spec, pre_process=False, post_process=False).to(device)
    block.train()

    x = torch.randn(seq, mbs, model.hidden_size, dtype=torch.bfloat16, device=device, requires_grad=True)
    mask = torch.ones(1, 1, seq, seq, dtype=torch.bool, device=device).triu(diagonal=1)  # True: masked
    rope = None
    if model.position_embedding_type is PositionEmbedding.ROPE:
        rope = RotaryEmbedding(kv_channels=model.kv_channels, rotary_percent=1.0)(seq).to(device)
    shared = [mask, *block.parameters(), *([rope] if rope is not None else [])]
    recorder = SavedTensorRecorder(exclude=shared)
    block.set_input_tensor(x)
    with recorder:
        out = block(hidden_states=x, attention_mask=mask, rotary_pos_emb=rope)
    held = recorder.held()
    out.float().sum().backward()  # the saved tensors were usable: backward runs through them
    return held
