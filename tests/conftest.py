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


def pytest_terminal_summary(terminalreporter):
    """Tables that tests attach with ``record_property("summary", text)`` (they travel from
    xdist workers with the report), printed after the run."""
    lines = []
    for outcome in ("passed", "failed"):
        for rep in terminalreporter.stats.get(outcome, []):
            lines += [value for name, value in getattr(rep, "user_properties", ()) if name == "summary"]
    if lines:
        terminalreporter.section("measured against megatron-core")
        for text in lines:
            terminalreporter.write_line(text)
