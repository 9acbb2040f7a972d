"""GetFeatureInfo HTML through a `GEOSERVER-FTL` static: the FreeMarker subset GeoServer templates use.

The platform renders text/html GetFeatureInfo with GeoServer, which runs a FreeMarker template
(`content.ftl`) over the features under the point. This module implements the part of FreeMarker
those templates use, over GeoServer's data model, and refuses the rest with a ValueError that names
what is not supported (so a static is refused at upload rather than failing at GetFeatureInfo).

Data model (as GeoServer's FeatureWrapper builds it):

- `features`: the list of features; `type.name` (also `type.title`): the layer's type name;
- a feature: `feature.fid` ("<type>.<id>"), `feature.typeName`, `feature.attributes` (a list of
  attributes, the geometry last), and `feature.<name>` / `feature["<name>"]`: one attribute;
- an attribute: `name`, `value` (text; "" for null, as GeoServer), `rawValue` (the value itself;
  missing when null), `type` ("String", "Integer", …), `isGeometry`.

Each feature given to `render_ftl` is either a GeoJSON-like dict (`{"id", "properties", "geometry"}`)
or a flat dict of attributes (then `fid`/`id` is not an attribute unless the dict has no other key).

Language subset:

- text, `${expression}` interpolations, comments `<#-- … -->`;
- `<#list sequence as item>…[<#sep>…][<#else>…]</#list>` (with `item?index`, `item?counter`,
  `item?has_next`, `item?is_first`, `item?is_last` and the older `item_index`, `item_has_next`);
- `<#if condition>…<#elseif condition>…<#else>…</#if>`; `<#assign name = expression>`;
- expressions: "text" and 'text' literals (raw `r"…"` too), numbers, `true`/`false`, names,
  `a.b`, `a["b"]`, `(…)`, `+ - * / %`, `== = != < > <= >= lt gt lte gte`, `&& || !`, `x!default`,
  `x!`, `(x.y)!default`, `x??`;
- built-ins: `?html`, `?string` (and `?string("yes", "no")` on booleans), `?c`, `?upper_case`,
  `?lower_case`, `?cap_first`, `?trim`, `?length`, `?size`, `?has_content`, `?url`, `?no_esc`.

Unlike GeoServer, every interpolation is HTML-escaped unless it went through `?html` (escaped once,
not twice) or `?no_esc`: attribute values are the producer's data, and this output is a web page.
Anything else — macros and functions (`<#macro>`, `<@…>`), `<#include>`, `<#import>`, other
directives, other built-ins — raises ValueError. A missing value interpolated without a default
raises ValueError too (FreeMarker's "undefined" error).
"""

from __future__ import annotations

import html
import re
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

MAX_TEMPLATE = 256 * 1024
MAX_OUTPUT = 16 * 1024 * 1024  # a template looping over itself is cut short
DIRECTIVES = ("if", "elseif", "else", "list", "sep", "assign")
BUILTINS = ("html", "string", "c", "upper_case", "lower_case", "cap_first", "trim", "length", "size",
            "has_content", "url", "no_esc", "index", "counter", "has_next", "is_first", "is_last")
_FEATURE_KEYS = {"fid", "typeName", "attributes", "type"}


class _Missing:
    """An undefined value (FreeMarker's null): only `!` and `??` accept it."""

    def __repr__(self) -> str:
        return "missing"


MISSING = _Missing()


class Safe(str):
    """Text already escaped for HTML (through `?html` or `?no_esc`)."""


# --- the data model ---------------------------------------------------------------------------------


@dataclass
class _Attribute:
    name: str
    raw: Any
    is_geometry: bool = False

    def get(self, key: str) -> Any:
        if key == "name":
            return self.name
        if key == "value":
            return "" if self.raw is None else _text(self.raw)
        if key == "rawValue":
            return MISSING if self.raw is None else self.raw
        if key == "isGeometry":
            return self.is_geometry
        if key == "type":
            return _type_name(self.raw, self.is_geometry)
        return MISSING


@dataclass
class _Feature:
    fid: str
    type_name: str
    attributes: list[_Attribute]

    def get(self, key: str) -> Any:
        if key == "fid":
            return self.fid
        if key == "typeName":
            return self.type_name
        if key == "attributes":
            return self.attributes
        for attribute in self.attributes:
            if attribute.name == key:
                return attribute
        return MISSING


def _type_name(value: Any, geometry: bool) -> str:
    if geometry:
        return "Geometry"
    return {bool: "Boolean", int: "Integer", float: "Double", str: "String"}.get(type(value), "Object")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(value)
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    if hasattr(value, "wkt"):
        return str(value.wkt)
    return str(value)


def _feature(data: dict[str, Any], type_name: str, number: int) -> _Feature:
    properties = data.get("properties")
    if isinstance(properties, dict) and set(data) <= {"type", "id", "fid", "geometry", "properties",
                                                         "geometry_name"}:
        fid = data.get("fid", data.get("id", number))
        attributes = [_Attribute(str(k), v) for k, v in properties.items()]
        if data.get("geometry") is not None:
            attributes.append(_Attribute(str(data.get("geometry_name") or "geometry"), data["geometry"], True))
    else:
        fid = data.get("fid", data.get("id", number))
        attributes = [_Attribute(str(k), v) for k, v in data.items() if k not in ("fid",)]
    fid_text = str(fid)
    if type_name and not fid_text.startswith(type_name + "."):
        fid_text = f"{type_name}.{fid_text}"
    return _Feature(fid_text, type_name, attributes)


# --- lexing and parsing ------------------------------------------------------------------------------


@dataclass
class _Text:
    text: str


@dataclass
class _Interpolation:
    expression: Any
    source: str


@dataclass
class _If:
    branches: list[tuple[Any, list[Any]]]  # (condition or None for else, body)


@dataclass
class _List:
    sequence: Any
    name: str
    body: list[Any]
    separator: list[Any] | None
    otherwise: list[Any] | None


@dataclass
class _Assign:
    name: str
    expression: Any


_TOKEN = re.compile(r"""
    \s*(?:
      (?P<string>r?"(?:[^"\\]|\\.)*"|r?'(?:[^'\\]|\\.)*')
    | (?P<number>\d+(?:\.\d+)?)
    | (?P<op>\?\?|==|!=|<=|>=|&&|\|\||[-+*/%!<>=().,\[\]?])
    | (?P<name>[A-Za-z_$@][\w$@]*)
    )""", re.VERBOSE)


def _tokens(source: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    position = 0
    source = source.rstrip()
    while position < len(source):
        match = _TOKEN.match(source, position)
        if match is None or match.end() == position:
            raise ValueError(f"FTL: cannot read the expression {source!r} at {source[position:position + 10]!r}")
        kind = match.lastgroup or ""
        out.append((kind, match.group(kind)))
        position = match.end()
        while position < len(source) and source[position].isspace():
            position += 1
    return out


class _Expression:
    """Recursive descent over the tokens of one expression; nodes are tuples."""

    WORDS = {"lt": "<", "gt": ">", "lte": "<=", "gte": ">="}

    def __init__(self, source: str) -> None:
        self.source = source
        self.tokens = _tokens(source)
        self.i = 0

    def peek(self, offset: int = 0) -> tuple[str, str]:
        index = self.i + offset
        return self.tokens[index] if index < len(self.tokens) else ("end", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        token = self.peek()
        if value is not None and token[1] != value:
            raise ValueError(f"FTL: expected {value!r} in {self.source!r}, found {token[1] or 'the end'!r}")
        self.i += 1
        return token

    def parse(self) -> Any:
        node = self.or_()
        if self.peek()[0] != "end":
            raise ValueError(f"FTL: unexpected {self.peek()[1]!r} in {self.source!r}")
        return node

    def or_(self) -> Any:
        node = self.and_()
        while self.peek()[1] == "||":
            self.take()
            node = ("or", node, self.and_())
        return node

    def and_(self) -> Any:
        node = self.not_()
        while self.peek()[1] == "&&":
            self.take()
            node = ("and", node, self.not_())
        return node

    def not_(self) -> Any:
        if self.peek()[1] == "!":
            self.take()
            return ("not", self.not_())
        return self.comparison()

    def comparison(self) -> Any:
        node = self.additive()
        kind, value = self.peek()
        operator = self.WORDS.get(value) if kind == "name" else value
        if operator in ("==", "=", "!=", "<", ">", "<=", ">="):
            self.take()
            node = ("compare", "==" if operator == "=" else operator, node, self.additive())
        return node

    def additive(self) -> Any:
        node = self.multiplicative()
        while self.peek()[1] in ("+", "-"):
            node = ("arith", self.take()[1], node, self.multiplicative())
        return node

    def multiplicative(self) -> Any:
        node = self.unary()
        while self.peek()[1] in ("*", "/", "%"):
            node = ("arith", self.take()[1], node, self.unary())
        return node

    def unary(self) -> Any:
        if self.peek()[1] == "-":
            self.take()
            return ("arith", "-", ("literal", 0), self.unary())
        return self.postfix()

    def postfix(self, allow_default: bool = True) -> Any:
        node = self.primary()
        while True:
            value = self.peek()[1]
            if value == ".":
                self.take()
                kind, name = self.take()
                if kind != "name":
                    raise ValueError(f"FTL: a name must follow '.' in {self.source!r}")
                node = ("get", node, ("literal", name))
            elif value == "[":
                self.take()
                key = self.or_()
                self.take("]")
                node = ("get", node, key)
            elif value == "??":
                self.take()
                node = ("exists", node)
            elif value == "?":
                self.take()
                kind, name = self.take()
                if kind != "name" or name not in BUILTINS:
                    raise ValueError(f"FTL: the built-in ?{name} is not supported (supported: "
                                     f"{', '.join('?' + b for b in BUILTINS)})")
                args: list[Any] = []
                if self.peek()[1] == "(":
                    self.take()
                    while self.peek()[1] != ")":
                        args.append(self.or_())
                        if self.peek()[1] == ",":
                            self.take()
                    self.take(")")
                node = ("builtin", name, node, args)
            elif value == "!" and allow_default and self.peek(1)[1] != "=":
                self.take()
                if self.peek()[0] in ("string", "number", "name") or self.peek()[1] in ("(", "-"):
                    node = ("default", node, self.postfix(allow_default=False))
                else:
                    node = ("default", node, ("literal", ""))
            else:
                return node

    def primary(self) -> Any:
        kind, value = self.take()
        if kind == "string":
            raw = value.startswith("r")
            body = value[2:-1] if raw else value[1:-1]
            return ("literal", body if raw else _unescape(body))
        if kind == "number":
            return ("literal", float(value) if "." in value else int(value))
        if kind == "name":
            if value in ("true", "false"):
                return ("literal", value == "true")
            return ("var", value)
        if value == "(":
            node = self.or_()
            self.take(")")
            return node
        raise ValueError(f"FTL: unexpected {value or 'end'!r} in {self.source!r}")


def _unescape(text: str) -> str:
    escapes = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "'": "'", "\\": "\\", "{": "{", "$": "$", "<": "<",
               ">": ">", "&": "&", "l": "<", "g": ">", "a": "&"}
    return re.sub(r"\\(.)", lambda m: escapes.get(m.group(1), m.group(0)), text)


def _directive_end(template: str, start: int) -> int:
    """Index of the `>` closing the directive opened at `start` (quotes and parentheses skipped)."""
    depth, quote, i = 0, "", start
    while i < len(template):
        char = template[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
        elif char == ">" and depth <= 0:
            return i
        i += 1
    raise ValueError(f"FTL: the directive at {template[start - 2:start + 20]!r} is not closed by '>'")


def _interpolation_end(template: str, start: int) -> int:
    depth, quote, i = 0, "", start
    while i < len(template):
        char = template[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'":
            quote = char
        elif char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise ValueError(f"FTL: the interpolation at {template[start - 2:start + 20]!r} is not closed by '}}'")


_MARK = re.compile(r"\$\{|<#--|</?#|<@|</@|\[#|\[/#")


def _lex(template: str) -> Iterator[tuple[str, str, str]]:
    """("text", text, ""), ("interp", expression, ""), ("open", name, params), ("close", name, "")."""
    position = 0
    while True:
        match = _MARK.search(template, position)
        if match is None:
            if position < len(template):
                yield ("text", template[position:], "")
            return
        if match.start() > position:
            yield ("text", template[position:match.start()], "")
        mark = match.group()
        if mark == "${":
            end = _interpolation_end(template, match.end())
            yield ("interp", template[match.end():end], "")
            position = end + 1
        elif mark == "<#--":
            end = template.find("-->", match.end())
            if end < 0:
                raise ValueError("FTL: a comment <#-- is not closed by -->")
            position = end + 3
        elif mark in ("<@", "</@"):
            raise ValueError("FTL: user-defined directives and macros (<@…>) are not supported")
        elif mark in ("[#", "[/#"):
            raise ValueError("FTL: the square bracket syntax ([#…]) is not supported; use <#…>")
        else:
            end = _directive_end(template, match.end())
            body = template[match.end():end].rstrip()
            if body.endswith("/"):
                body = body[:-1]
            name_match = re.match(r"\s*([A-Za-z_]\w*)", body)
            name = name_match.group(1) if name_match else body.strip()
            if name not in DIRECTIVES:
                raise ValueError(f"FTL: the directive #{name} is not supported (supported: "
                                 f"{', '.join('#' + d for d in DIRECTIVES)})")
            params = body[name_match.end():].strip() if name_match else ""
            yield ("close" if mark == "</#" else "open", name, params)
            position = end + 1


def _parse_nodes(tokens: list[tuple[str, str, str]], i: int, stops: tuple[str, ...]) -> tuple[list[Any], int]:
    """Nodes until one of `stops` (an "open else"/"open elseif"/"open sep" or a "close X" token),
    returning the index of the stop token."""
    nodes: list[Any] = []
    while i < len(tokens):
        kind, name, params = tokens[i]
        if (kind == "close" and f"/{name}" in stops) or (kind == "open" and name in stops):
            return nodes, i
        if kind == "text":
            nodes.append(_Text(name))
            i += 1
        elif kind == "interp":
            nodes.append(_Interpolation(_Expression(name).parse(), name))
            i += 1
        elif kind == "close":
            raise ValueError(f"FTL: </#{name}> closes nothing")
        elif name == "if":
            branches: list[tuple[Any, list[Any]]] = []
            condition: Any = _Expression(params).parse()
            while True:
                body, i = _parse_nodes(tokens, i + 1, ("elseif", "else", "/if"))
                if i >= len(tokens):
                    raise ValueError("FTL: <#if> is not closed by </#if>")
                branches.append((condition, body))
                kind, name, params = tokens[i]
                if kind == "close":
                    break
                if condition is None:
                    raise ValueError("FTL: <#else> must come last in an <#if>")
                condition = _Expression(params).parse() if name == "elseif" else None
            nodes.append(_If(branches))
            i += 1
        elif name == "list":
            match = re.fullmatch(r"(.+?)\s+as\s+([A-Za-z_]\w*)", params, re.DOTALL)
            if match is None:
                raise ValueError(f"FTL: <#list {params}> must read <#list sequence as name>")
            body, i = _parse_nodes(tokens, i + 1, ("sep", "else", "/list"))
            separator = otherwise = None
            if tokens[i][:2] == ("open", "sep"):
                separator, i = _parse_nodes(tokens, i + 1, ("else", "/list"))
            if tokens[i][:2] == ("open", "else"):
                otherwise, i = _parse_nodes(tokens, i + 1, ("/list",))
            nodes.append(_List(_Expression(match.group(1)).parse(), match.group(2), body, separator, otherwise))
            i += 1
        elif name == "assign":
            match = re.fullmatch(r"([A-Za-z_]\w*)\s*=\s*(.+)", params, re.DOTALL)
            if match is None:
                raise ValueError(f"FTL: <#assign {params}> must read <#assign name = expression>")
            nodes.append(_Assign(match.group(1), _Expression(match.group(2)).parse()))
            i += 1
        else:
            raise ValueError(f"FTL: <#{name}> outside of the directive it belongs to")
    if stops:
        raise ValueError(f"FTL: a directive is not closed (expected <{stops[-1].replace('/', '/#')}>)")
    return nodes, i


@lru_cache(maxsize=64)
def _parse(template: str) -> list[Any]:
    if len(template) > MAX_TEMPLATE:
        raise ValueError(f"FTL: the template exceeds {MAX_TEMPLATE} bytes")
    nodes, _ = _parse_nodes(list(_lex(template)), 0, ())
    return nodes


# --- evaluation -------------------------------------------------------------------------------------


@dataclass
class _Loop:
    index: int
    size: int

    def builtin(self, name: str) -> Any:
        return {"index": self.index, "counter": self.index + 1, "has_next": self.index + 1 < self.size,
                "is_first": self.index == 0, "is_last": self.index + 1 == self.size}[name]


class _Scope:
    def __init__(self, variables: dict[str, Any]) -> None:
        self.frames: list[dict[str, Any]] = [variables]
        self.loops: dict[str, _Loop] = {}

    def lookup(self, name: str) -> Any:
        for frame in reversed(self.frames):
            if name in frame:
                return frame[name]
        for suffix, key in (("_index", "index"), ("_has_next", "has_next")):
            if name.endswith(suffix) and name[: -len(suffix)] in self.loops:
                return self.loops[name[: -len(suffix)]].builtin(key)
        return MISSING


def _get(container: Any, key: Any) -> Any:
    if container is MISSING:
        return MISSING
    if isinstance(container, _Feature | _Attribute):
        return container.get(str(key))
    if isinstance(container, dict):
        return container.get(key, MISSING)
    if isinstance(container, list | tuple) and isinstance(key, int) and not isinstance(key, bool):
        return container[key] if 0 <= key < len(container) else MISSING
    return MISSING


def _scalar(value: Any, source: str) -> Any:
    """An attribute used where a value is expected is its value (`${feature.nom}` prints the value)."""
    if isinstance(value, _Attribute):
        return value.get("value")
    if value is MISSING:
        raise ValueError(f"FTL: {source!r} is undefined (use {source}! or {source}?? to allow it)")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    try:
        return float(value) if "." in str(value) or "e" in str(value).lower() else int(value)
    except (TypeError, ValueError):
        return None


def _compare(operator: str, left: Any, right: Any) -> bool:
    a, b = _number(left), _number(right)
    if a is None or b is None or isinstance(left, str) and isinstance(right, str):
        a, b = (left if isinstance(left, str) else _text(left)), (right if isinstance(right, str) else _text(right))
        if isinstance(left, bool) and isinstance(right, bool):
            a, b = left, right
    return bool({"==": a == b, "!=": a != b, "<": a < b, ">": a > b, "<=": a <= b, ">=": a >= b}[operator])


class _Renderer:
    def __init__(self, scope: _Scope) -> None:
        self.scope = scope
        self.out: list[str] = []
        self.size = 0

    def write(self, text: str) -> None:
        self.size += len(text)
        if self.size > MAX_OUTPUT:
            raise ValueError(f"FTL: the output exceeds {MAX_OUTPUT} characters")
        self.out.append(text)

    def value(self, node: Any) -> Any:  # noqa: C901 - one branch per node kind
        kind = node[0]
        if kind == "literal":
            return node[1]
        if kind == "var":
            return self.scope.lookup(node[1])
        if kind == "get":
            return _get(self.value(node[1]), _scalar(self.value(node[2]), "key"))
        if kind == "exists":
            value = self.value(node[1])
            return value is not MISSING
        if kind == "default":
            value = self.value(node[1])
            return self.value(node[2]) if value is MISSING else value
        if kind == "not":
            return not self.truth(node[1])
        if kind == "and":
            return self.truth(node[1]) and self.truth(node[2])
        if kind == "or":
            return self.truth(node[1]) or self.truth(node[2])
        if kind == "compare":
            return _compare(node[1], self.scalar(node[2]), self.scalar(node[3]))
        if kind == "arith":
            left, right = self.scalar(node[2]), self.scalar(node[3])
            if node[1] == "+" and (isinstance(left, str) or isinstance(right, str)):
                return _text(left) + _text(right)
            a, b = _number(left), _number(right)
            if a is None or b is None:
                raise ValueError(f"FTL: {node[1]} needs numbers, not {left!r} and {right!r}")
            if node[1] in ("/", "%") and b == 0:
                raise ValueError("FTL: division by zero")
            result = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b, "/": lambda: a / b,
                      "%": lambda: a % b}[node[1]]()
            return int(result) if isinstance(result, float) and result.is_integer() and node[1] != "/" else result
        if kind == "builtin":
            return self.builtin(node[1], node[2], [self.scalar(a) for a in node[3]])
        raise AssertionError(kind)

    def scalar(self, node: Any) -> Any:
        return _scalar(self.value(node), _source(node))

    def truth(self, node: Any) -> bool:
        value = self.scalar(node)
        if isinstance(value, bool):
            return value
        raise ValueError(f"FTL: the condition {_source(node)!r} is not true/false but {value!r}")

    def builtin(self, name: str, target: Any, args: list[Any]) -> Any:
        if name in ("index", "counter", "has_next", "is_first", "is_last"):
            if target[0] != "var" or target[1] not in self.scope.loops:
                raise ValueError(f"FTL: ?{name} applies to a #list loop variable")
            return self.scope.loops[target[1]].builtin(name)
        value = self.value(target)
        if name == "has_content":
            value = value.get("value") if isinstance(value, _Attribute) else value
            return value is not MISSING and value != "" and value != [] and value is not None
        if name == "size":
            if not isinstance(value, list):
                raise ValueError(f"FTL: ?size applies to a sequence, not {_source(target)!r}")
            return len(value)
        value = _scalar(value, _source(target))
        if name == "string" and args:
            if not isinstance(value, bool) or len(args) != 2:
                raise ValueError("FTL: ?string(\"yes\", \"no\") applies to a boolean")
            return _text(args[0] if value else args[1])
        text = value if isinstance(value, str) else _text(value)
        operations: dict[str, Callable[[], Any]] = {
            "html": lambda: Safe(text if isinstance(value, Safe) else html.escape(text)),
            "no_esc": lambda: Safe(text),
            "string": lambda: text if isinstance(value, str) else _text(value),
            "c": lambda: _text(value),
            "upper_case": lambda: text.upper(),
            "lower_case": lambda: text.lower(),
            "cap_first": lambda: text[:1].upper() + text[1:],
            "trim": lambda: text.strip(),
            "length": lambda: len(text),
            "url": lambda: urllib.parse.quote(text, safe=""),
        }
        return operations[name]()

    def run(self, nodes: list[Any]) -> None:
        for node in nodes:
            if isinstance(node, _Text):
                self.write(node.text)
            elif isinstance(node, _Interpolation):
                value = _scalar(self.value(node.expression), node.source)
                if isinstance(value, list | _Feature):
                    raise ValueError(f"FTL: ${{{node.source}}} is a sequence or a feature, not a value")
                text = value if isinstance(value, str) else _text(value)
                self.write(text if isinstance(value, Safe) else html.escape(text))
            elif isinstance(node, _If):
                for condition, body in node.branches:
                    if condition is None or self.truth(condition):
                        self.run(body)
                        break
            elif isinstance(node, _List):
                sequence = self.value(node.sequence)
                if not isinstance(sequence, list):
                    raise ValueError(f"FTL: <#list {_source(node.sequence)} …> needs a sequence")
                if not sequence:
                    if node.otherwise is not None:
                        self.run(node.otherwise)
                    continue
                saved = self.scope.loops.get(node.name)
                for index, item in enumerate(sequence):
                    self.scope.frames.append({node.name: item})
                    self.scope.loops[node.name] = _Loop(index, len(sequence))
                    try:
                        self.run(node.body)
                        if node.separator is not None and index + 1 < len(sequence):
                            self.run(node.separator)
                    finally:
                        self.scope.frames.pop()
                if saved is None:
                    self.scope.loops.pop(node.name, None)
                else:
                    self.scope.loops[node.name] = saved
            elif isinstance(node, _Assign):
                self.scope.frames[-1][node.name] = self.value(node.expression)


def _source(node: Any) -> str:
    kind = node[0]
    if kind == "var":
        return str(node[1])
    if kind == "literal":
        return repr(node[1])
    if kind == "get":
        key = node[2]
        if key[0] == "literal" and isinstance(key[1], str) and key[1].isidentifier():
            return f"{_source(node[1])}.{key[1]}"
        return f"{_source(node[1])}[{_source(key)}]"
    if kind == "builtin":
        return f"{_source(node[2])}?{node[1]}"
    return kind


def render_ftl(template: str, features: list[dict[str, Any]], type_name: str = "") -> str:
    """The template's output over `features` (see the module docstring for the data model and the
    subset); ValueError for an unsupported construct or an undefined value."""
    nodes = _parse(template)
    model = [_feature(data, type_name, number) for number, data in enumerate(features, 1)]
    scope = _Scope({"features": model, "type": {"name": type_name, "title": type_name}})
    renderer = _Renderer(scope)
    renderer.run(nodes)
    return "".join(renderer.out)


# --- attributes a template reads -----------------------------------------------------------------------


def ftl_attributes(template: str) -> set[str]:
    """The attribute names a template reads through `feature.<name>` or `feature["<name>"]` (for any
    loop variable over `features`, or `features[i]`), for validation against the table; raises
    ValueError as `render_ftl` would for an unsupported construct."""
    out: set[str] = set()

    def feature_like(node: Any, features_vars: set[str]) -> bool:
        if node[0] == "var":
            return node[1] in features_vars
        return node[0] == "get" and node[1] == ("var", "features") and not (
            node[2][0] == "literal" and isinstance(node[2][1], str))

    def expression(node: Any, features_vars: set[str]) -> None:
        if not isinstance(node, tuple):
            return
        if node[0] == "get" and feature_like(node[1], features_vars):
            key = node[2]
            if key[0] == "literal" and isinstance(key[1], str) and key[1] not in _FEATURE_KEYS:
                out.add(key[1])
        for child in node[1:]:
            if isinstance(child, tuple):
                expression(child, features_vars)
            elif isinstance(child, list):
                for item in child:
                    expression(item, features_vars)

    def walk(nodes: list[Any], features_vars: set[str]) -> None:
        for node in nodes:
            if isinstance(node, _Interpolation):
                expression(node.expression, features_vars)
            elif isinstance(node, _If):
                for condition, body in node.branches:
                    if condition is not None:
                        expression(condition, features_vars)
                    walk(body, features_vars)
            elif isinstance(node, _List):
                expression(node.sequence, features_vars)
                inner = features_vars - {node.name}
                if node.sequence == ("var", "features"):
                    inner = inner | {node.name}
                walk(node.body, inner)
                walk(node.separator or [], inner)
                walk(node.otherwise or [], features_vars)
            elif isinstance(node, _Assign):
                expression(node.expression, features_vars)

    walk(_parse(template), set())
    return out
