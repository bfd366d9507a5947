"""Shared fixtures: specs composed from the embedded Hydra configs."""

from __future__ import annotations

import pytest

from uniap_megatron.cli import compose
from uniap_megatron.spec.config import request_from_config


def request(*overrides: str):
    return request_from_config(compose(list(overrides)))


@pytest.fixture
def llama3_70b_64():
    return request("model=llama3_70b", "cluster=dgx_h100", "cluster.num_nodes=8", "train.global_batch_size=128")
