"""The bundled rule set holds the official figures, and broken rule files fail with a precise message."""

import json
from pathlib import Path

import pytest

from micronet_score import MicronetError, RuleError, load_rules
from micronet_score.counting.costs import Prices
from micronet_score.ruleset import bundled_rule_names

BUNDLED = Path(__file__).resolve().parents[1] / "rules" / "micronet-2019.toml"


@pytest.fixture(scope="module")
def rules():
    return load_rules("micronet-2019")


def test_bundled_rule_sets_are_listed():
    assert "micronet-2019" in bundled_rule_names()


def test_official_baselines(rules):
    # scoring_and_submission.md, "Ranking Entries": the denominators used verbatim.
    assert (rules.track("imagenet").baseline_params, rules.track("imagenet").baseline_flops) == (6.9e6, 1170e6)
    assert (rules.track("CIFAR-100").baseline_params, rules.track("cifar100").baseline_flops) == (36.5e6, 10.49e9)
    assert (rules.track("WikiText-103").baseline_params, rules.track("wikitext103").baseline_flops) == (159e6, 318e6)


def test_official_worked_example(rules):
    # "ImageNet entry with 3M params and 500M ops -> 3M/6.9M + 500M/1170M = .862"
    assert round(rules.score(3e6, 500e6, "imagenet"), 3) == 0.862


@pytest.mark.parametrize(
    ("track", "passing", "failing"),
    [
        ("imagenet", 37_500, 37_499),  # FAQ: at least 37,500 of 50,000, no rounding
        ("cifar100", 8_000, 7_999),  # at least 8,000 of 10,000
        ("wikitext103", 35.0, 35.000001),  # 35 or below
    ],
)
def test_thresholds_are_hard(rules, track, passing, failing):
    assert rules.track(track).qualifies(passing)
    assert not rules.track(track).qualifies(failing)


def test_perplexity_nan_never_qualifies(rules):
    assert not rules.track("wikitext103").qualifies(float("nan"))


def test_averaging_unit(rules):
    assert rules.track("imagenet").per == "sample"
    assert rules.track("wikitext103").per == "token"


def test_unit_freebie_mask_and_accumulator(rules):
    assert rules.unit_bits == 32 and rules.accumulator_bits == 32
    f = rules.freebie
    assert (f.param_bits, f.mult_bits, f.add_bits) == (16, 16, 32)
    assert rules.mask.bits_per_element == 1 and rules.mask.bits_per_block == 1
    assert rules.folding.batch_norm_after_linear == "bias"


def test_official_op_prices(rules):
    # counting.py: a dot product of length n is n mults and n - 1 adds; a bias 1 add per output.
    prices = Prices(rules)
    [(_, dot)] = prices.charge([], "dot_product", 10 * 7, 7)
    assert dot == (70, 63, 0)
    [(_, bias)] = prices.charge([], "bias", 7)
    assert bias[1] == 7
    assert (rules.ops["relu"].per_element.mults, rules.ops["relu"].per_element.adds) == (1, 0)
    silu = rules.ops["silu"].per_element
    assert (silu.mults, silu.adds) == (3, 1)
    sigmoid = rules.ops["sigmoid"].per_element
    assert (sigmoid.mults, sigmoid.adds) == (2, 1)
    assert rules.ops["transcendental"].per_element.others == 1
    # softmax over n values: n exp + (n - 1) adds + n divisions = 3n - 1 (the MIT entry's figure)
    [(_, s)] = prices.charge([], "softmax", 97, 1)
    assert sum(s) == 3 * 97 - 1


def test_unknown_track_is_a_clear_error(rules):
    with pytest.raises(MicronetError, match=r"unknown track 'mnist'.* imagenet, cifar100, wikitext103"):
        rules.track("mnist")


def _write(tmp_path, text):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    return path


def test_missing_key_names_file_and_key(tmp_path):
    text = BUNDLED.read_text().replace("accumulator_bits = 32\n", "")
    path = _write(tmp_path, text)
    with pytest.raises(RuleError) as err:
        load_rules(path)
    assert str(path) in str(err.value)
    assert err.value.key == "accumulator_bits"
    assert "missing" in err.value.problem


def test_wrong_type_names_the_key(tmp_path):
    text = BUNDLED.read_text().replace('threshold = 8000', 'threshold = "eight thousand"')
    with pytest.raises(RuleError) as err:
        load_rules(_write(tmp_path, text))
    assert err.value.key == "tracks.cifar100.threshold"
    assert "eight thousand" in err.value.problem


def test_negative_baseline_is_rejected(tmp_path):
    text = BUNDLED.read_text().replace("baseline_params = 6.9e6", "baseline_params = -6.9e6")
    with pytest.raises(RuleError) as err:
        load_rules(_write(tmp_path, text))
    assert err.value.key == "tracks.imagenet.baseline_params"
    assert "greater than or equal to 1" in err.value.problem


def test_negative_per_element_price_is_rejected(tmp_path):
    mul = "[ops.mul]\nper_element = { mults = 1 }"
    text = BUNDLED.read_text().replace(mul, mul.replace("mults = 1", "mults = -1"))
    with pytest.raises(RuleError) as err:
        load_rules(_write(tmp_path, text))
    assert err.value.key == "ops.mul"


def test_unknown_key_is_rejected(tmp_path):
    text = BUNDLED.read_text().replace("[mask]\n", "[mask]\nbits_per_elemnt = 1\n")
    with pytest.raises(RuleError) as err:
        load_rules(_write(tmp_path, text))
    assert err.value.key == "mask.bits_per_elemnt"


def test_invalid_toml(tmp_path):
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules(_write(tmp_path, "name = \n"))


def test_missing_file(tmp_path):
    with pytest.raises(RuleError, match="no such file"):
        load_rules(tmp_path / "nope.toml")


def test_user_rule_file_is_used(tmp_path):
    # A historical variant: the pre-2019-08-14 16-bit unit.
    text = BUNDLED.read_text().replace('name = "micronet-2019"', 'name = "sixteen"')
    text = text.replace("unit_bits = 32", "unit_bits = 16")
    rules = load_rules(_write(tmp_path, text))
    assert (rules.name, rules.unit_bits) == ("sixteen", 16)


def test_json_round_trip(rules):
    again = type(rules).model_validate(json.loads(json.dumps(rules.model_dump(mode="json"))))
    assert again == rules.model_copy(update={"source": ""})
