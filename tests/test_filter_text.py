"""The filter text parser: each form of the grammar maps onto the Filter message, bad text is refused by name."""
from __future__ import annotations

import pytest

from lookalike.filter_text import parse_filter
from lookalike.v1 import searcher_pb2
from lookalike.v1.searcher_pb2 import Condition, Filter, NumericRange, StringList


def one(text: str) -> Condition:
    parsed = parse_filter(text)
    assert len(parsed.all) == 1
    return parsed.all[0]


def test_the_example_maps_onto_three_conditions() -> None:
    assert parse_filter('in_stock = "true" AND brand IN ("a", "b") AND price <= 50') == Filter(all=[
        Condition(attribute="in_stock", equals="true"),
        Condition(attribute="brand", one_of=StringList(values=["a", "b"])),
        Condition(attribute="price", range=NumericRange(lte=50)),
    ])


def test_the_result_survives_the_wire_with_only_the_fields_it_sets() -> None:
    parsed = parse_filter("size != xl and price > 10 and colour not in (red, 'dark blue')")
    again = searcher_pb2.Filter.FromString(parsed.SerializeToString())
    assert again == parsed
    size, price, colour = again.all
    assert (size.attribute, size.WhichOneof("test"), size.equals, size.negate) == ("size", "equals", "xl", True)
    assert (price.attribute, price.WhichOneof("test"), price.negate) == ("price", "range", False)
    assert price.range.HasField("gt") and price.range.gt == 10.0
    assert not any(price.range.HasField(bound) for bound in ("gte", "lte", "lt"))
    assert colour.WhichOneof("test") == "one_of" and colour.negate
    assert list(colour.one_of.values) == ["red", "dark blue"]
    # The request carries it as is.
    request = searcher_pb2.SearchRequest(k=5, filter=parsed)
    assert searcher_pb2.SearchRequest.FromString(request.SerializeToString()).filter == parsed


@pytest.mark.parametrize("op, bound", [("<", "lt"), ("<=", "lte"), (">", "gt"), (">=", "gte")])
def test_each_comparison_is_a_one_sided_range(op: str, bound: str) -> None:
    condition = one(f"price {op} 3.5")
    assert condition.range == NumericRange(**{bound: 3.5})
    assert [field.name for field, _ in condition.range.ListFields()] == [bound]
    assert not condition.negate


def test_equals_and_not_equals() -> None:
    assert one("brand = acme") == Condition(attribute="brand", equals="acme")
    assert one("brand != acme") == Condition(attribute="brand", equals="acme", negate=True)
    assert one("brand=acme") == Condition(attribute="brand", equals="acme")


@pytest.mark.parametrize("text, number", [("-12", -12.0), ("3.5", 3.5), ("1e3", 1000.0), ("0.25", 0.25),
                                          (".5", 0.5), ("2E-2", 0.02), ("1e+3", 1000.0)])
def test_bare_numbers_compare_as_numbers_and_equal_as_written(text: str, number: float) -> None:
    assert one(f"x >= {text}").range.gte == number
    assert one(f"x = {text}").equals == text


def test_numbers_keep_their_text_when_compared_with_equals() -> None:
    assert one("price = 50").equals == "50"
    assert one("price = 50.0").equals == "50.0"
    assert one("price IN (1, 2.50, -3)").one_of.values == ["1", "2.50", "-3"]


def test_in_and_not_in() -> None:
    assert one("brand IN (a)") == Condition(attribute="brand", one_of=StringList(values=["a"]))
    assert one('brand in ("a", \'b\', c-d)').one_of.values == ["a", "b", "c-d"]
    assert one("brand NOT IN (a, b)") == Condition(attribute="brand", one_of=StringList(values=["a", "b"]), negate=True)
    assert one("brand not in(a,b)").negate


def test_not_flips_negate() -> None:
    assert one("NOT brand = a") == Condition(attribute="brand", equals="a", negate=True)
    assert one("not brand != a") == Condition(attribute="brand", equals="a", negate=False)
    assert one("NOT NOT price < 3") == Condition(attribute="price", range=NumericRange(lt=3))
    assert one("NOT brand NOT IN (a)") == Condition(attribute="brand", one_of=StringList(values=["a"]))
    assert one("NOT price > 3").negate
    assert [c.negate for c in parse_filter("a = 1 AND NOT b = 2 AND c = 3").all] == [False, True, False]


def test_keywords_are_case_insensitive() -> None:
    assert parse_filter("a = 1 and b In (x) AnD NOT c nOt iN (y)") == Filter(all=[
        Condition(attribute="a", equals="1"),
        Condition(attribute="b", one_of=StringList(values=["x"])),
        Condition(attribute="c", one_of=StringList(values=["y"]), negate=False),
    ])


def test_quoting_and_escapes() -> None:
    assert one(r'title = "say \"hi\""').equals == 'say "hi"'
    assert one(r'path = "a\\b"').equals == "a\\b"
    assert one(r'path = "ends with \\"').equals == "ends with \\"
    assert one("""title = 'say "hi"'""").equals == 'say "hi"'
    assert one("""title = "it's" """).equals == "it's"
    assert one("title = 'a, b AND c'").equals == "a, b AND c"
    assert one('title = ""').equals == ""
    assert one("title = 'NOT'").equals == "NOT"  # a keyword, quoted, is a value
    assert one('"not" = x').attribute == "not"
    assert one('"colour (main)" = red').attribute == "colour (main)"
    assert one('"a\\"b" = 1').attribute == 'a"b'


def test_names_may_have_dots_and_dashes() -> None:
    assert one("meta.size-eu = 42").attribute == "meta.size-eu"
    assert one("_x = 1").attribute == "_x"


def test_whitespace_is_free() -> None:
    assert parse_filter("  a=1\tAND\nb  IN  ( x ,y )  ") == parse_filter("a = 1 AND b IN (x, y)")


@pytest.mark.parametrize("text, message", [
    ("", "the text is empty"),
    ("   \n", "the text is empty"),
    ("brand IN ()", "IN () at position 9 is empty"),
    ("brand NOT IN ( )", "IN () at position 13 is empty"),
    ("a = 1 OR b = 2", "OR is not supported: a filter is the AND of its conditions (OR at position 6)"),
    ("a = 1 or b = 2", "OR is not supported"),
    ("price <= ", "expected a value after '<=' at position 9, found the end of the text"),
    ("price < abc", "'<' needs a number, found 'abc' at position 8"),
    ('price < "5"', "'<' needs a number, found '5' at position 8"),
    ("price > 1e999", "the number '1e999' at position 8 is out of range"),
    ("a = 1 AND", "expected an attribute name at position 9, found the end of the text"),
    ("a = 1 b = 2", "expected AND or the end of the text at position 6, found 'b'"),
    ("a = 1 AND AND b = 2", "expected an attribute name at position 10, found 'AND'"),
    ("1abc = 2", "expected an attribute name at position 0, found '1abc'"),
    ("'brand' = a", "expected an attribute name at position 0, found \"'brand'\""),
    ('"" = a', "expected an attribute name at position 0"),
    ("brand", "expected an operator (= != < <= > >= IN NOT IN) after 'brand' at position 5, found the end"),
    ("brand == a", "expected a value after '=' at position 7, found '='"),
    ("brand NOT = a", "expected IN after NOT at position 10, found '='"),
    ("brand IN a, b", "expected '(' after IN at position 9, found 'a'"),
    ("brand IN (a b)", "expected ',' or ')' in the IN list at position 12, found 'b'"),
    ("brand IN (a,)", "expected a value after ',' at position 12, found ')'"),
    ("brand IN (a", "expected ',' or ')' in the IN list at position 11, found the end of the text"),
    ("brand = AND", "expected a value after '=' at position 8, found 'AND' (quote a value spelt like a keyword)"),
    ('brand = "abc', "an unterminated string at position 8"),
    ("brand = 'abc", "an unterminated string at position 8"),
    (r'brand = "a\nb"', r"unsupported escape '\\n' at position 10"),
    ("brand = a && b = c", "an unexpected character '&' at position 10"),
    ("brand ~ a", "an unexpected character '~' at position 6"),
    ("(a = 1)", "expected an attribute name at position 0, found '('"),
    ("NOT", "expected an attribute name at position 3, found the end of the text"),
])
def test_bad_text_is_refused_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        parse_filter(text)
    assert str(refused.value).startswith("filter: ")
    assert message in str(refused.value)
