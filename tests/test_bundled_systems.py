"""The systems of this branch are registered, build on the meta device, and name tracks of the rule set."""

from __future__ import annotations

import pytest
import torch
from micronet_score.models.registry import get

from micronet_score.ruleset import load_rules


@pytest.mark.parametrize(
    ("name", "alias", "track"),
    [("jaist-qrnn", "qrnn", "wikitext103"), ("pyramidnet-272", "pyramidnet", "cifar100"),
     ("wave-pyramidnet", "wavecomp-pyramidnet", "cifar100"), ("efficientnet-b0", "efficientnet", "imagenet")],
)
def test_registered_with_default_config_and_example_inputs(name, alias, track):
    spec = get(name)
    assert get(alias) is spec and spec.track == track and spec.title
    load_rules("micronet-2019").track(spec.track)
    with torch.device("meta"):
        model = spec.build(spec.default_config)
    (example,) = spec.example_inputs(model)
    assert example.shape[0] == 1
