"""Exact resume for every network type: 4 steps straight (a state at step 2) against the same run resumed
from its step-2 state give the same losses and bit-equal weights, for each LyCORIS algo over SD1.x (and
LoCon with DoRA), kohya's networks.lora with conv_dim and networks.dylora."""

from __future__ import annotations

import pytest

from tests.test_durable import assets, check_resume_equals_straight  # noqa: F401
from tests.test_lycoris import ALGOS

LYCORIS = {algo: dict(network_module="lycoris.kohya", network_dim=4, network_alpha=2, network_args=args)
           for algo, args in ALGOS.items()}     # every algo, and LoCon with DoRA's weight decomposition
NETWORKS = {
    **{f"lycoris-{algo}": opts for algo, opts in LYCORIS.items()},
    "lora-conv_dim": dict(network_module="networks.lora", network_dim=4, network_alpha=2,
                          network_args=["conv_dim=4", "conv_alpha=2"]),
    "dylora": dict(network_module="networks.dylora", network_dim=4, network_alpha=2, network_args=["unit=2"]),
}


@pytest.mark.parametrize("network", list(NETWORKS))
def test_resume_from_a_saved_state_equals_the_straight_run_for_each_network_type(assets, tmp_path, network):
    check_resume_equals_straight(assets, tmp_path / "out", learning_rate=1e-3, **NETWORKS[network])
