"""Variant names (persona_tune.variants): parse and format round trips, what a name stands for, bad names."""

import pytest

from persona_tune.errors import ConfigError
from persona_tune.variants import Variant, trunk_prefix

NAMES = ["persona", "persona_0", "persona_12-msml", "single_min", "single_max-ms", "prompted-ml", "myvariant",
         "trunk-single_max-ms", "trunk-demo-persona_0-ms", "trunk-demo-persona-ms", "trunk-t-prompted-ms",
         "trunk-n1000-collab-lm-probe-single_max-ms", "trunk-x"]


@pytest.mark.parametrize("name", NAMES)
def test_a_parsed_name_formats_back_to_itself(name):
    v = Variant.parse(name)
    assert v.name == str(v) == name
    assert Variant.parse(v.name) == v
    assert Variant(v.base, v.tag, v.prefix) == v


def test_the_parts_of_a_name():
    v = Variant.parse("trunk-demo-persona_0-ms")
    assert (v.prefix, v.base, v.tag) == ("trunk-demo", "persona_0", "ms")
    assert (v.trunk, v.label, v.memory, v.persona, v.per_persona) == (True, "demo", "ms", 0, False)
    v = Variant.parse("trunk-n1000-collab-lm-probe-single_max-ms")  # a label may hold '-'
    assert (v.label, v.base, v.tag) == ("n1000-collab-lm-probe", "single_max", "ms")
    assert v.label_parts == ["n1000", "collab", "lm", "probe"]
    assert Variant.parse("trunk-single_max-ms").label is None and Variant.parse("trunk-single_max-ms").label_parts == []
    assert Variant.parse("persona-msml").memory == "ms+ml"
    assert Variant.parse("single_max").tag is None and not Variant.parse("single_max").trunk
    assert Variant.parse("persona_3").persona == 3 and Variant.parse("persona").per_persona
    # "prompted" is the base model on the stock path only; the trunk path trains its own prompted variant.
    assert Variant.parse("prompted-ms").base_model and not Variant.parse("trunk-t-prompted-ms").base_model
    assert Variant.parse("single_min-ms").single and not Variant.parse("trunk-single_min-ms").single


def test_related_variants_are_built_from_the_parts():
    cell = Variant.parse("trunk-demo-persona-ms")
    assert cell.for_persona(2).name == "trunk-demo-persona_2-ms"
    assert cell.for_persona("{persona}").name == "trunk-demo-persona_{persona}-ms"
    assert Variant.parse("persona-ms").with_prefix(trunk_prefix("t")).name == "trunk-t-persona-ms"
    assert Variant.of("persona", "ms+ml").name == "persona-msml"
    assert Variant.of("single_max", "ms", trunk=True, label="demo").name == "trunk-demo-single_max-ms"
    assert Variant.of("prompted", "ml", trunk=True).name == "trunk-prompted-ml"
    assert Variant.of("single_max").name == "single_max"
    assert trunk_prefix(None) == "trunk" and trunk_prefix("n1000") == "trunk-n1000"


@pytest.mark.parametrize("name, message", [
    ("", "invalid variant name ''"),
    ("../persona", "invalid variant name '../persona': use only letters, digits, '_' and '-'"),
    ("persona ms", "invalid variant name 'persona ms'"),
    ("trunk-", "invalid variant name 'trunk-': an empty part between '-'"),
    ("-ms", "invalid variant name '-ms': an empty part"),
    ("trunk--single_max-ms", "an empty part between '-'"),
    (None, "invalid variant name None"),
])
def test_a_bad_name_is_one_clear_line(name, message):
    with pytest.raises(ConfigError) as e:
        Variant.parse(name)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert Variant.maybe(name) is None


def test_bad_parts_are_refused():
    with pytest.raises(ConfigError, match="invalid memory tag 'xx'.*use one of ms, msml, ml"):
        Variant("persona", "xx")
    with pytest.raises(ConfigError, match="invalid variant base 'a-b': one part without '-'"):
        Variant("a-b")
    with pytest.raises(ConfigError, match="invalid variant prefix 'trunk-': an empty part"):
        Variant.parse("single_max-ms").with_prefix("trunk-")
    with pytest.raises(ConfigError, match="memory must be one of ms, ms\\+ml, ml, got 'msml'"):
        Variant.of("persona", "msml")
    with pytest.raises(ConfigError, match="invalid label 'a/b'"):
        trunk_prefix("a/b")
