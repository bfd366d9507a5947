"""The plan's flags through Megatron-LM's own argument parser and checks.

``megatron.training.arguments.parse_args`` and ``validate_args`` (shipped in the
megatron-core wheel) run exactly as ``pretrain_gpt.py`` runs them, on the plan's
``megatron_args`` plus the model's architecture flags. Three things stand in for the
cluster the job would start on:

- ``WORLD_SIZE`` is the plan's cluster size and ``RANK`` 0, as torchrun would set them;
  ``CUDA_DEVICE_MAX_CONNECTIONS=1`` where the cluster needs it, as the launch script sets it.
- ``--tokenizer-type NullTokenizer --vocab-size V`` stand in for the tokenizer (only its
  vocabulary size matters to the model).
- ``validate_args`` asks the GPU for its architecture in one place,
  ``get_device_arch_version()`` (Ampere 8, Hopper 9, Blackwell 10), to decide which
  CUDA_DEVICE_MAX_CONNECTIONS rule applies. There is no GPU here, so that one function
  answers for the plan's cluster (:func:`device_arch`) while the checks run; every other
  check runs unchanged.

Deriving the ``TransformerConfig`` from the flags (``core_transformer_config_from_args``)
also checks that the fused kernels Megatron-LM enables by default exist. The job's
Transformer Engine provides them; where it is not installed (this CPU check), the fusion
switches whose kernels are missing are turned off for that step only, and a note says so.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from unittest import mock

from uniap_megatron.emit.megatron_args import model_args
from uniap_megatron.spec.cluster import ClusterSpec
from uniap_megatron.validate.core_config import Rejection, megatron_error
from uniap_megatron.validate.plan_file import PlanDocument

# Architecture major versions by GPU name; others follow cluster.cuda_device_max_connections_needed.
_ARCH_BY_GPU = (("a100", 8), ("a800", 8), ("h100", 9), ("h200", 9), ("h800", 9), ("gh200", 9), ("b200", 10), ("b300", 10))


def device_arch(cluster: ClusterSpec) -> int:
    """The CUDA architecture major version of the plan's GPUs."""
    name = cluster.gpu.lower()
    for key, arch in _ARCH_BY_GPU:
        if key in name:
            return arch
    return 9 if cluster.cuda_device_max_connections_needed else 10


def tokenizer_stand_in(doc: PlanDocument) -> list[str]:
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(doc.model.vocab_size)]


def argv_of(doc: PlanDocument) -> list[str]:
    """What ``pretrain_gpt.py`` would receive: the plan's flags, the model's, a tokenizer."""
    return [*doc.megatron_args, *model_args(doc.model), *tokenizer_stand_in(doc)]


@dataclass
class ArgumentCheck:
    args: object | None = None
    """Megatron-LM's validated ``argparse.Namespace``; None when parsing or validation failed."""
    config: object | None = None
    """The ``TransformerConfig`` Megatron-LM derives from the flags."""
    padded_vocab_size: int | None = None
    problems: list = field(default_factory=list)
    """Strings, and :class:`Rejection` where one of Megatron's checks refused."""
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@contextlib.contextmanager
def _as_launched(doc: PlanDocument, argv: list[str]) -> Iterator[io.StringIO]:
    """sys.argv, the environment and the GPU architecture of the plan's launch; Megatron's
    printing (the whole argument table) goes to the returned buffer instead of stdout."""
    from megatron.training import arguments

    env = {"WORLD_SIZE": str(doc.cluster.world_size), "RANK": "0", "LOCAL_RANK": "0"}
    if doc.cluster.cuda_device_max_connections_needed:
        env["CUDA_DEVICE_MAX_CONNECTIONS"] = "1"
    arch = device_arch(doc.cluster)
    out = io.StringIO()
    with (
        mock.patch.dict(os.environ, env),
        mock.patch.object(sys, "argv", ["pretrain_gpt.py", *argv]),
        mock.patch.object(arguments, "get_device_arch_version", lambda: arch),
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(out),
    ):
        yield out


def check_arguments(doc: PlanDocument) -> ArgumentCheck:
    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import parse_args, validate_args
    from megatron.training.vocab_utils import calculate_padded_vocab_size

    result = ArgumentCheck()
    argv = argv_of(doc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _as_launched(doc, argv) as out:
            try:
                args = parse_args()
            except SystemExit:
                result.problems.append(Rejection("Megatron-LM's parser", "the flags", _parser_error(out.getvalue())))
                return result
            try:
                validate_args(args)
            except Exception as err:  # noqa: BLE001 - every failure of Megatron's checks is reported
                result.problems.append(Rejection("Megatron-LM validate_args", "the flags", megatron_error(err)))
                return result
            try:
                result.config = core_transformer_config_from_args(_without_missing_kernels(args, result))
            except Exception as err:  # noqa: BLE001
                result.problems.append(
                    Rejection("megatron-core TransformerConfig (from Megatron-LM's flags)", "the flags", megatron_error(err))
                )
            result.padded_vocab_size = calculate_padded_vocab_size(
                args.vocab_size, args.make_vocab_size_divisible_by, args.tensor_model_parallel_size,
                logging_enabled=False,
            )
    result.args = args
    result.warnings = _megatron_warnings(caught)
    result.problems += _plan_differences(doc, args, result.padded_vocab_size)
    return result


def _missing_kernel_switches() -> list[str]:
    """Fusion switches of Megatron-LM whose kernels (Transformer Engine) are absent here."""
    from megatron.core.models.common.embeddings import rope_utils

    missing = []
    if rope_utils.fused_apply_rotary_pos_emb is None and rope_utils.fused_apply_rotary_pos_emb_thd is None:
        missing.append("apply_rope_fusion")
    return missing


def _without_missing_kernels(args, result: ArgumentCheck):
    switched = [name for name in _missing_kernel_switches() if getattr(args, name, False)]
    if not switched:
        return args
    result.notes.append(
        f"Megatron-LM turns on {', '.join(switched)}, whose kernel comes with Transformer Engine, which is "
        "not installed here: off while deriving Megatron-LM's TransformerConfig from the flags."
    )
    copy = argparse.Namespace(**vars(args))
    for name in switched:
        setattr(copy, name, False)
    return copy


def _parser_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "error:" in line]
    return lines[-1].split("error:", 1)[1].strip() if lines else " ".join(text.split()[-20:])


def _megatron_warnings(caught) -> list[str]:
    """Warnings Megatron's argument code raised about these flags (not import-time noise)."""
    out = []
    for w in caught:
        path = str(w.filename)
        if "megatron/training" in path and str(w.message) not in out:
            out.append(" ".join(str(w.message).split()))
    return out


def _plan_differences(doc: PlanDocument, args, padded_vocab: int | None) -> list[str]:
    """What Megatron-LM made of the flags, against what the plan says."""
    s, train, model = doc.strategy, doc.train, doc.model
    expected = {
        "data_parallel_size": (s.dp, "strategy.dp"),
        "micro_batch_size": (s.mbs, "strategy.mbs"),
        "global_batch_size": (train.global_batch_size, "train.global_batch_size"),
        "seq_length": (train.seq_length, "train.seq_length"),
        "use_distributed_optimizer": (s.distributed_optimizer, "strategy.distributed_optimizer"),
        "sequence_parallel": (s.sp, "strategy.sp"),
        "untie_embeddings_and_output_weights": (
            model.untie_embeddings_and_output_weights, "model.untie_embeddings_and_output_weights"),
        "position_embedding_type": (model.position_embedding_type.value, "model.position_embedding_type"),
    }
    problems = []
    for name, (want, source) in expected.items():
        got = getattr(args, name, None)
        if got != want:
            problems.append(f"{source} is {want!r} but Megatron-LM ends up with {name} = {got!r}.")
    if padded_vocab is not None and padded_vocab != model.padded_vocab_size(s.tp):
        problems.append(
            f"the plan pads the vocabulary ({model.vocab_size}) to {model.padded_vocab_size(s.tp)} but "
            f"Megatron-LM pads it to {padded_vocab}."
        )
    if args.max_position_embeddings is not None and args.max_position_embeddings < train.seq_length and (
        model.position_embedding_type.value == "learned_absolute"
    ):
        problems.append(
            f"max_position_embeddings ({args.max_position_embeddings}) must be at least train.seq_length "
            f"({train.seq_length}) with learned absolute positions."
        )
    return problems
