"""kvfold options: every bad key or value is refused with a message that names it."""

import pytest

from kvfold.attention_backends.selection import method_for, options_for
from kvfold.options import KvfoldConfigError, MethodOptions, parse_options


class Budgeted(MethodOptions):
    budget: int = 1024
    sink: int = 4


def test_defaults_and_values() -> None:
    assert parse_options("X", Budgeted, {}) == Budgeted(budget=1024, sink=4)
    assert parse_options("X", Budgeted, {"budget": 2048}).budget == 2048


def test_unknown_key_is_named_with_the_allowed_ones() -> None:
    with pytest.raises(KvfoldConfigError, match=r"unknown option 'budgte'.*Options of X: budget, sink"):
        parse_options("X", Budgeted, {"budgte": 2048})


def test_bad_value_is_named() -> None:
    with pytest.raises(KvfoldConfigError, match=r"option 'budget'.*'lots'"):
        parse_options("X", Budgeted, {"budget": "lots"})


def test_dense_has_no_options() -> None:
    assert options_for("KVFOLD_DENSE", {}) == options_for("KVFOLD_DENSE", {"kvfold": {}})
    with pytest.raises(KvfoldConfigError, match=r"KVFOLD_DENSE.*unknown option 'budget'"):
        options_for("KVFOLD_DENSE", {"kvfold": {"budget": 2048}})


def test_custom_names_its_method() -> None:
    assert method_for("CUSTOM", {"kvfold": {"method": "dense"}}) == "KVFOLD_DENSE"
    assert method_for("CUSTOM", {"kvfold": {"method": "KVFOLD_DENSE"}}) == "KVFOLD_DENSE"
    with pytest.raises(KvfoldConfigError, match="none was given"):
        method_for("CUSTOM", {})
    with pytest.raises(KvfoldConfigError, match="unknown kvfold method 'nope'"):
        method_for("CUSTOM", {"kvfold": {"method": "nope"}})


def test_method_may_not_contradict_the_selected_backend() -> None:
    assert method_for("KVFOLD_DENSE", {"kvfold": {"method": "dense"}}) == "KVFOLD_DENSE"
    with pytest.raises(KvfoldConfigError, match="contradicts"):
        method_for("KVFOLD_DENSE", {"kvfold": {"method": "vqkv"}})


def test_section_must_be_an_object() -> None:
    with pytest.raises(KvfoldConfigError, match="must be a JSON object"):
        options_for("KVFOLD_DENSE", {"kvfold": [1, 2]})
