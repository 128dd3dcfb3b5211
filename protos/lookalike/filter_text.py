"""A filter written as text, turned into the Search request's Filter message.

    expression := condition ( AND condition )*
    condition  := NAME op value                    op: =  !=  <  <=  >  >=
                | NAME [NOT] IN ( value , value ... )
                | NOT condition                    (negates it)
    NAME       := [A-Za-z_][A-Za-z0-9_.-]*  |  "double-quoted"
    value      := "double-quoted" (escapes \\" and \\\\)  |  'single-quoted'
                | a bare number (-12, 3.5, 1e3)  |  a bare word [A-Za-z0-9_.-]+

Keywords (AND, IN, NOT) are case-insensitive; quote a name or value that is spelt like one.
`=` tests equality of strings (a number keeps its text as written: `size = 50` is equals "50"),
`<` `<=` `>` `>=` a numeric range (the value must be a number), `!=` and NOT IN are negated tests.
There is no OR: a Filter is the AND of its conditions. Example:

    in_stock = "true" AND brand IN ("a", "b") AND price <= 50

Errors are ValueError naming the 0-based position in the text where it went wrong.
"""
from __future__ import annotations

import math
import re
from typing import NamedTuple

from lookalike.v1 import searcher_pb2

_TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<sq>'[^']*')
  | (?P<op><=|>=|!=|=|<|>)
  | (?P<punct>[(),])
  | (?P<num>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)(?![A-Za-z0-9_.-])
  | (?P<word>[A-Za-z0-9_.-]+)
""", re.VERBOSE | re.DOTALL)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
_KEYWORDS = {"AND", "IN", "NOT", "OR"}
_RANGE = {"<": "lt", "<=": "lte", ">": "gt", ">=": "gte"}


class _Token(NamedTuple):
    kind: str  # a group name of _TOKEN, or "end"
    text: str
    pos: int

    def keyword(self) -> str | None:
        return self.text.upper() if self.kind == "word" and self.text.upper() in _KEYWORDS else None

    def __str__(self) -> str:
        return "the end of the text" if self.kind == "end" else repr(self.text)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            what = "an unterminated string" if text[pos] in "\"'" else f"an unexpected character {text[pos]!r}"
            raise ValueError(f"filter: {what} at position {pos}")
        if match.lastgroup != "space":
            tokens.append(_Token(match.lastgroup or "", match.group(), pos))
        pos = match.end()
    return tokens + [_Token("end", "", len(text))]


def _unquote(token: _Token) -> str:
    if token.kind == "sq":
        return token.text[1:-1]

    def unescape(escape: re.Match[str]) -> str:
        if escape.group(1) not in '"\\':
            raise ValueError(f"filter: unsupported escape {escape.group()!r} at position "
                             f'{token.pos + 1 + escape.start()} (only \\" and \\\\ are)')
        return escape.group(1)

    return re.sub(r"\\(.)", unescape, token.text[1:-1], flags=re.DOTALL)


class _Parser:
    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.at = 0

    def next(self) -> _Token:
        token = self.tokens[self.at]
        self.at += token.kind != "end"
        return token

    def peek(self, offset: int = 0) -> _Token:
        return self.tokens[self.at + offset]

    def expression(self) -> searcher_pb2.Filter:
        if self.peek().kind == "end":
            raise ValueError("filter: the text is empty")
        conditions = [self.condition()]
        while (token := self.next()).kind != "end":
            if token.keyword() == "OR":
                raise ValueError(f"filter: OR is not supported: a filter is the AND of its conditions "
                                 f"(OR at position {token.pos})")
            if token.keyword() != "AND":
                raise ValueError(f"filter: expected AND or the end of the text at position {token.pos}, found {token}")
            conditions.append(self.condition())
        return searcher_pb2.Filter(all=conditions)

    def condition(self) -> searcher_pb2.Condition:
        token = self.next()
        if token.keyword() == "NOT":
            condition = self.condition()
            condition.negate = not condition.negate
            return condition
        name = self.name(token)
        op = self.next()
        if op.keyword() == "NOT":
            if (after := self.next()).keyword() != "IN":
                raise ValueError(f"filter: expected IN after NOT at position {after.pos}, found {after}")
            return searcher_pb2.Condition(attribute=name, one_of=self.value_list(), negate=True)
        if op.keyword() == "IN":
            return searcher_pb2.Condition(attribute=name, one_of=self.value_list())
        if op.kind != "op":
            raise ValueError(f"filter: expected an operator (= != < <= > >= IN NOT IN) after {name!r} "
                             f"at position {op.pos}, found {op}")
        text, number = self.value(after=op.text)
        if op.text in ("=", "!="):
            return searcher_pb2.Condition(attribute=name, equals=text, negate=op.text == "!=")
        if number is None:
            raise ValueError(f"filter: {op.text!r} needs a number, found {text!r} at position {self.peek(-1).pos}")
        return searcher_pb2.Condition(attribute=name, range=searcher_pb2.NumericRange(**{_RANGE[op.text]: number}))

    @staticmethod
    def name(token: _Token) -> str:
        if token.kind == "dq" and _unquote(token):
            return _unquote(token)
        if token.kind == "word" and not token.keyword() and _NAME.fullmatch(token.text):
            return token.text
        raise ValueError(f"filter: expected an attribute name at position {token.pos}, found {token}")

    def value(self, after: str) -> tuple[str, float | None]:
        """The value's text, and its number when it is a bare number (a quoted "5" is a string)."""
        token = self.next()
        if token.kind in ("dq", "sq"):
            return _unquote(token), None
        if token.kind == "num":
            number = float(token.text)
            # 1e999 reads as infinity, which no attribute value can be compared with.
            if not math.isfinite(number):
                raise ValueError(f"filter: the number {token.text!r} at position {token.pos} is out of range")
            return token.text, number
        if token.kind == "word" and not token.keyword():
            return token.text, None
        hint = " (quote a value spelt like a keyword)" if token.keyword() else ""
        raise ValueError(f"filter: expected a value after {after!r} at position {token.pos}, found {token}{hint}")

    def value_list(self) -> searcher_pb2.StringList:
        if (token := self.next()).text != "(":
            raise ValueError(f"filter: expected '(' after IN at position {token.pos}, found {token}")
        if self.peek().text == ")":
            raise ValueError(f"filter: IN () at position {token.pos} is empty: it needs at least one value")
        values = [self.value(after="(")[0]]
        while (token := self.next()).text == ",":
            values.append(self.value(after=",")[0])
        if token.text != ")":
            raise ValueError(f"filter: expected ',' or ')' in the IN list at position {token.pos}, found {token}")
        return searcher_pb2.StringList(values=values)


def parse_filter(text: str) -> searcher_pb2.Filter:
    """The Filter that `text` describes (grammar in the module docstring); ValueError when it is not one."""
    return _Parser(text).expression()
