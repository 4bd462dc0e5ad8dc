"""Exact resume for every network type: 4 steps straight (a state at step 2) against the same run resumed
from its step-2 state give the same losses and bit-equal weights, for each LyCORIS algo over SD1.x (and
LoCon with DoRA), kohya's networks.lora with conv_dim and networks.dylora."""

from __future__ import annotations

import pytest

from tests.test_durable import assets, make_config, max_abs_diff, read_tensors, train  # noqa: F401
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
    opts = dict(max_train_steps=4, learning_rate=1e-3, **NETWORKS[network])
    out = tmp_path / "out"
    straight = train(make_config(assets, out, **opts))
    assert straight.result.status == "completed", straight.result.error
    final = read_tensors(straight.result.final_path)
    step4 = read_tensors(out / "spyke_demo-step00000004.safetensors")
    resumed = train(make_config(assets, out, resume=str(out / "spyke_demo-step00000002-state"), **opts))
    assert resumed.result.status == "completed", resumed.result.error
    assert [e.step for e in resumed.steps] == [3, 4]
    ref = {e.step: e.loss for e in straight.steps}
    assert {e.step: e.loss for e in resumed.steps} == {3: ref[3], 4: ref[4]}
    assert max_abs_diff(final, read_tensors(resumed.result.final_path)) == 0.0
    assert max_abs_diff(step4, read_tensors(out / "spyke_demo-step00000004.safetensors")) == 0.0
