"""A small, strict evaluator for the subset of Terraform the modules use, so that the tests can
render `templatefile()` output and evaluate validations and preconditions without Terraform
(which cannot be installed here).

Faithful where it matters for the tests, and loud everywhere else: anything outside the subset
(an unknown function, operator, heredoc, `...` expansion, a `%{ }` directive inside a quoted
string) raises `Unsupported` instead of guessing.

- Templates (templatefile and quoted strings) follow hclsyntax: literal tokens split after each
  newline and at every `$`/`%` that does not open a sequence; `~}` strips the leading whitespace
  of the next literal token only, `${~`/`%{~` the trailing whitespace of the previous literal
  token only; `$${` and `%%{` are escapes. `%{ if }`/`%{ else }`/`%{ endif }`,
  `%{ for v in X }`/`%{ for k, v in X }`/`%{ endfor }`.
- Values: str, int/float (numbers), bool, None (null), list, dict (maps and objects). Maps and
  objects iterate in lexicographic key order, as cty does. Sets are sorted lists.
- Interpolating null, a list or a map is an error, as in Terraform. Numbers render like cty
  (`8080`, `0.5`), bools as `true`/`false`.
- `cond ? a : b` and `%{ if }` evaluate only the chosen branch (HCL evaluates both but reports
  only the chosen branch's errors; type unification of the two branches is not modelled).
  `&&`/`||` evaluate both operands (no short-circuit, as in Terraform 1.5's HCL).
- Variable values are converted to the declared type: optional attributes get their default or
  null, numbers/bools become strings where a string is declared. Unlike Terraform, an object
  attribute the type does not declare is an error (Terraform drops it silently): a typo in a
  test input should fail.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import json
import math
import os
import re
from decimal import Decimal
from pathlib import Path

import hcl2
from hcl2.utils import SerializationOptions


class Unsupported(Exception):
    """The expression or template uses something this evaluator does not implement."""


class EvalError(Exception):
    """The expression fails, as it would in Terraform (caught by `can()`/`try()`)."""


# ----------------------------------------------------------------------------------------------
# Scanning: strings, interpolations and expression tokens


def _scan_string_end(src: str, pos: int) -> int:
    """`pos` is just after an opening quote; returns the index of the closing quote."""
    i = pos
    while i < len(src):
        c = src[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i
        if src.startswith("$${", i) or src.startswith("%%{", i):
            i += 3
            continue
        if src.startswith("${", i) or src.startswith("%{", i):
            i = _scan_sequence_end(src, i + 2) + 1
            continue
        if c == "\n":
            raise EvalError("newline in a quoted string")
        i += 1
    raise EvalError("unterminated string")


def _scan_sequence_end(src: str, pos: int) -> int:
    """`pos` is just after `${`/`%{`; returns the index of the matching `}`."""
    depth = 0
    i = pos
    while i < len(src):
        c = src[i]
        if c == '"':
            i = _scan_string_end(src, i + 1) + 1
            continue
        if c in "{[(":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif c == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise EvalError("unterminated ${ or %{ sequence")


_TOKEN_RE = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op>==|!=|<=|>=|&&|\|\||=>|\.\.\.|\[\*\]|\.\*|[-+*/%<>!?:.,()\[\]{}=])
    """,
    re.VERBOSE,
)


def tokenize(src: str) -> list[tuple[str, object]]:
    toks: list[tuple[str, object]] = []
    i = 0
    while i < len(src):
        if src[i] == '"':
            end = _scan_string_end(src, i + 1)
            toks.append(("str", src[i + 1 : end]))
            i = end + 1
            continue
        if src.startswith("<<", i):
            raise Unsupported("heredoc in an expression")
        if src[i] == "#" or src.startswith("//", i) or src.startswith("/*", i):
            raise Unsupported("comment inside an expression")
        m = _TOKEN_RE.match(src, i)
        if not m:
            raise Unsupported(f"cannot tokenize {src[i:i + 20]!r}")
        kind = m.lastgroup
        if kind == "num":
            text = m.group()
            toks.append(("num", int(text) if re.fullmatch(r"\d+", text) else float(text)))
        elif kind == "ident":
            toks.append(("ident", m.group()))
        elif kind == "op":
            toks.append(("op", m.group()))
        i = m.end()
    toks.append(("eof", None))
    return toks


# ----------------------------------------------------------------------------------------------
# Parsing expressions into tuples


class _Parser:
    def __init__(self, src: str):
        self.src = src
        self.toks = tokenize(src)
        self.i = 0

    def peek(self, k: int = 0):
        return self.toks[min(self.i + k, len(self.toks) - 1)]

    def next(self):
        t = self.toks[self.i]
        self.i += 1
        return t

    def accept(self, kind, value=None):
        t = self.peek()
        if t[0] == kind and (value is None or t[1] == value):
            self.i += 1
            return t
        return None

    def expect(self, kind, value=None):
        t = self.accept(kind, value)
        if t is None:
            raise EvalError(f"expected {value or kind}, found {self.peek()} in {self.src!r}")
        return t

    def parse(self):
        e = self.expr()
        if self.peek()[0] != "eof":
            raise Unsupported(f"trailing tokens {self.toks[self.i:]} in {self.src!r}")
        return e

    def expr(self):
        cond = self.binary(0)
        if self.accept("op", "?"):
            a = self.expr()
            self.expect("op", ":")
            b = self.expr()
            return ("cond", cond, a, b)
        return cond

    _LEVELS = [("||",), ("&&",), ("==", "!="), ("<", "<=", ">", ">="), ("+", "-"), ("*", "/", "%")]

    def binary(self, level):
        if level == len(self._LEVELS):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek()[0] == "op" and self.peek()[1] in self._LEVELS[level]:
            op = self.next()[1]
            right = self.binary(level + 1)
            left = ("bin", op, left, right)
        return left

    def unary(self):
        if self.accept("op", "!"):
            return ("not", self.unary())
        if self.accept("op", "-"):
            return ("neg", self.unary())
        return self.postfix()

    def postfix(self):
        e = self.primary()
        while True:
            if self.accept("op", "."):
                t = self.next()
                if t[0] == "ident":
                    e = ("attr", e, t[1])
                elif t[0] == "num" and isinstance(t[1], int):
                    e = ("index", e, ("lit", t[1]))
                else:
                    raise Unsupported(f"traversal .{t}")
            elif self.accept("op", "["):
                idx = self.expr()
                self.expect("op", "]")
                e = ("index", e, idx)
            elif self.accept("op", "[*]") or self.accept("op", ".*"):
                rest = []
                while self.peek() == ("op", "."):
                    self.next()
                    rest.append(self.expect("ident")[1])
                e = ("splat", e, rest)
            else:
                return e

    def primary(self):
        t = self.next()
        kind, val = t
        if kind == "num":
            return ("lit", val)
        if kind == "str":
            return ("tmpl", parse_template(val, quoted=True))
        if kind == "ident":
            if val in ("true", "false"):
                return ("lit", val == "true")
            if val == "null":
                return ("lit", None)
            if self.accept("op", "("):
                args = []
                while not self.accept("op", ")"):
                    args.append(self.expr())
                    if self.accept("op", "..."):
                        raise Unsupported("argument expansion (...)")
                    if not self.accept("op", ","):
                        self.expect("op", ")")
                        break
                return ("call", val, args)
            return ("ref", val)
        if t == ("op", "("):
            e = self.expr()
            self.expect("op", ")")
            return e
        if t == ("op", "["):
            if self.peek() == ("ident", "for"):
                return self.for_expr("]")
            items = []
            while not self.accept("op", "]"):
                items.append(self.expr())
                if not self.accept("op", ","):
                    self.expect("op", "]")
                    break
            return ("tuple", items)
        if t == ("op", "{"):
            if self.peek() == ("ident", "for"):
                return self.for_expr("}")
            items = []
            while not self.accept("op", "}"):
                k = self.next()
                if k[0] == "ident":
                    key = ("lit", k[1])
                elif k[0] == "str":
                    key = ("tmpl", parse_template(k[1], quoted=True))
                elif k == ("op", "("):
                    key = self.expr()
                    self.expect("op", ")")
                else:
                    raise Unsupported(f"object key {k}")
                if not (self.accept("op", "=") or self.accept("op", ":")):
                    raise EvalError(f"expected = in object constructor: {self.src!r}")
                items.append((key, self.expr()))
                self.accept("op", ",")
            return ("object", items)
        raise Unsupported(f"unexpected token {t} in {self.src!r}")

    def for_expr(self, close):
        self.expect("ident", "for")
        names = [self.expect("ident")[1]]
        if self.accept("op", ","):
            names.append(self.expect("ident")[1])
        self.expect("ident", "in")
        coll = self.expr()
        self.expect("op", ":")
        if close == "}":
            kexpr = self.expr()
            self.expect("op", "=>")
            vexpr = self.expr()
            if self.accept("op", "..."):
                raise Unsupported("grouping for expression (...)")
        else:
            kexpr, vexpr = None, self.expr()
        cond = None
        if self.accept("ident", "if"):
            cond = self.expr()
        self.expect("op", close)
        key_var, val_var = (names[0], names[1]) if len(names) == 2 else (None, names[0])
        return ("for", close, key_var, val_var, coll, kexpr, vexpr, cond)


def parse_expr(src: str):
    return _Parser(src).parse()


# ----------------------------------------------------------------------------------------------
# Templates


def _literal_tokens(text: str) -> list[str]:
    """Split literal text like hclsyntax's BareStringLiteral: after each newline, and around
    every `$`/`%` (each is a token of its own, escapes `$${`/`%%{` are 3-character tokens)."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$${", i) or text.startswith("%%{", i):
            out.append(text[i : i + 3])
            i += 3
            continue
        if text[i] in "$%":
            j = i + 1
            if j < len(text) and text[j] == "\n":
                j += 1
            out.append(text[i:j])
            i = j
            continue
        m = re.compile(r"[^$%\n]*\n?").match(text, i)
        out.append(m.group())
        i = m.end()
    return out


def _unescape_literal(tok: str, quoted: bool) -> str:
    tok = tok.replace("$${", "${").replace("%%{", "%{")
    if not quoted:
        return tok
    out, i = [], 0
    while i < len(tok):
        c = tok[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        n = tok[i + 1]
        simple = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
        if n in simple:
            out.append(simple[n])
            i += 2
        elif n == "u":
            out.append(chr(int(tok[i + 2 : i + 6], 16)))
            i += 6
        elif n == "U":
            out.append(chr(int(tok[i + 2 : i + 10], 16)))
            i += 10
        else:
            raise EvalError(f"invalid escape \\{n}")
    return "".join(out)


def parse_template(src: str, quoted: bool = False):
    """Parses template text (a templatefile() file, or the inside of a quoted string) into a
    list of parts: ("lit", str) | ("interp", ast) | ("if", cond, then, else) | ("for", ...)."""
    flat: list = []  # ("lit", str) | ("interp", ast) | ("ctl", words, ast?)
    can_trim_prev = False
    ltrim_next = False
    i = 0
    while i < len(src):
        # find the next sequence opener that is not an escape
        j = i
        while j < len(src):
            if src.startswith("$${", j) or src.startswith("%%{", j):
                j += 3
                continue
            if src.startswith("${", j) or src.startswith("%{", j):
                break
            j += 1
        toks = _literal_tokens(src[i:j])
        if not toks:
            # `~}` only strips a literal token that immediately follows it.
            ltrim_next = False
        for tok in toks:
            val = _unescape_literal(tok, quoted)
            if ltrim_next:
                val = val.lstrip()
                ltrim_next = False
            flat.append(["lit", val])
            can_trim_prev = True
        if j >= len(src):
            break
        kind = src[j]
        start = j + 2
        strip_left = src.startswith("~", start)
        if strip_left:
            start += 1
            if can_trim_prev and flat and flat[-1][0] == "lit":
                flat[-1][1] = flat[-1][1].rstrip()
        end = _scan_sequence_end(src, start)
        body = src[start:end]
        strip_right = body.rstrip().endswith("~")
        if strip_right:
            body = body.rstrip()[:-1]
        if kind == "$":
            flat.append(["interp", parse_expr(body)])
        else:
            if quoted:
                raise Unsupported("%{ } directive inside a quoted string")
            flat.append(["ctl", body.strip()])
        can_trim_prev = False
        ltrim_next = strip_right
        i = end + 1
    return _build_template(flat)


def _build_template(flat):
    pos = 0

    def block(stop):
        nonlocal pos
        parts = []
        while pos < len(flat):
            item = flat[pos]
            if item[0] == "lit":
                parts.append(("lit", item[1]))
                pos += 1
            elif item[0] == "interp":
                parts.append(("interp", item[1]))
                pos += 1
            else:
                words = item[1].split(None, 1)
                kw = words[0]
                if kw in stop:
                    return parts, kw
                pos += 1
                if kw == "if":
                    cond = parse_expr(words[1])
                    then, ended = block({"else", "endif"})
                    other = []
                    if ended == "else":
                        pos += 1
                        other, ended = block({"endif"})
                    if ended != "endif":
                        raise EvalError("if without endif")
                    pos += 1
                    parts.append(("if", cond, then, other))
                elif kw == "for":
                    m = re.fullmatch(r"([A-Za-z_]\w*)(?:\s*,\s*([A-Za-z_]\w*))?\s+in\s+(.+)", words[1], re.S)
                    if not m:
                        raise EvalError(f"bad for directive {item[1]!r}")
                    key_var, val_var = (m.group(1), m.group(2)) if m.group(2) else (None, m.group(1))
                    coll = parse_expr(m.group(3))
                    body, ended = block({"endfor"})
                    if ended != "endfor":
                        raise EvalError("for without endfor")
                    pos += 1
                    parts.append(("tfor", key_var, val_var, coll, body))
                else:
                    raise Unsupported(f"template directive {kw!r}")
        if stop:
            raise EvalError(f"missing {'/'.join(sorted(stop))}")
        return parts, None

    parts, _ = block(set())
    return parts


# ----------------------------------------------------------------------------------------------
# Values


def number_text(v) -> str:
    if isinstance(v, bool):
        raise EvalError("not a number")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise EvalError("number is not finite")
        if v == int(v):
            return str(int(v))
        return format(Decimal(repr(v)), "f")
    raise EvalError(f"not a number: {v!r}")


def to_string(v) -> str:
    if v is None:
        raise EvalError("the expression result is null; cannot include a null value in a string template")
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return number_text(v)
    if isinstance(v, str):
        return v
    raise EvalError(f"cannot include a {type(v).__name__} in a string template")


def to_number(v):
    if isinstance(v, bool) or v is None:
        raise EvalError(f"a number is required, not {v!r}")
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            return int(v) if re.fullmatch(r"-?\d+", v) else float(v)
        except ValueError:
            raise EvalError(f"cannot convert {v!r} to a number") from None
    raise EvalError(f"a number is required, not {type(v).__name__}")


def _norm_num(x):
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return int(x)
    return x


def jsonencode(v) -> str:
    """Terraform's jsonencode: compact, keys sorted, Go's HTML-safe escaping."""

    def norm(x):
        if isinstance(x, dict):
            return {k: norm(x[k]) for k in sorted(x)}
        if isinstance(x, list):
            return [norm(e) for e in x]
        if isinstance(x, float):
            return _norm_num(x)
        if isinstance(x, str) and re.search(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", x):
            raise Unsupported("control characters in jsonencode (Go and Python escape them differently)")
        return x

    s = json.dumps(norm(v), separators=(",", ":"), ensure_ascii=False)
    for a, b in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        s = s.replace(a, b)
    return s


def _equal(a, b) -> bool:
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if type(a) is not type(b) and not (a is None or b is None):
        return False
    return a == b


def _iterate(coll):
    """(key, value) pairs in cty order: lists by index, maps/objects by sorted key."""
    if isinstance(coll, list):
        return list(enumerate(coll))
    if isinstance(coll, dict):
        return [(k, coll[k]) for k in sorted(coll)]
    raise EvalError(f"cannot iterate over {coll!r}")


def _regex(pattern, s):
    # RE2 and Python agree on the patterns the modules use (classes, groups, anchors).
    m = re.search(pattern, s)
    if not m:
        raise EvalError(f"pattern {pattern!r} does not match {s!r}")
    if m.re.groupindex:
        return m.groupdict()
    if m.re.groups:
        return list(m.groups())
    return m.group()


def _cidrhost(prefix, n):
    try:
        net = ipaddress.ip_network(prefix, strict=False)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if n >= net.num_addresses:
        raise EvalError("host number out of range")
    return str(net.network_address + n)


def _sort_strings(xs):
    if not all(isinstance(x, str) for x in xs):
        xs = [to_string(x) for x in xs]
    return sorted(xs)


def _toset(xs):
    if not isinstance(xs, list):
        raise EvalError("toset needs a list")
    uniq = []
    for x in xs:
        if not any(_equal(x, u) for u in uniq):
            uniq.append(x)
    if all(isinstance(x, str) for x in uniq):
        return sorted(uniq)
    if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in uniq):
        return sorted(uniq)
    return uniq


_Missing = object()


def _fail(message):
    raise EvalError(message)


def _not_null(name, *args):
    for a in args:
        if a is None:
            raise EvalError(f"{name}: argument must not be null")


def _slice(xs, a, b):
    a, b = to_number(a), to_number(b)
    if not 0 <= a <= b <= len(xs):
        raise EvalError("slice out of range")
    return xs[a:b]


FUNCTIONS = {
    "jsonencode": jsonencode,
    "tostring": lambda v: None if v is None else to_string(v),
    "tonumber": lambda v: None if v is None else to_number(v),
    "length": lambda v: len(v) if isinstance(v, (list, dict, str)) else _fail(f"length of {v!r}"),
    "concat": lambda *ls: [x for l in ls for x in l],
    "setproduct": lambda *ls: [list(t) for t in itertools.product(*ls)],
    "compact": lambda l: [x for x in l if x not in (None, "")],
    "distinct": lambda l: [x for i, x in enumerate(l) if not any(_equal(x, y) for y in l[:i])],
    "flatten": lambda l: [y for x in l for y in (FUNCTIONS["flatten"](x) if isinstance(x, list) else [x])],
    "sort": _sort_strings,
    "toset": _toset,
    "tolist": lambda l: list(l),
    "keys": lambda m: sorted(m),
    "values": lambda m: [m[k] for k in sorted(m)],
    "merge": lambda *ms: {k: v for m in ms if m is not None for k, v in m.items()},
    "join": lambda sep, l: (_not_null("join", sep, l), sep.join(to_string(x) for x in l))[1],
    "split": lambda sep, s: (_not_null("split", sep, s), s.split(sep))[1],
    "element": lambda l, i: l[to_number(i) % len(l)] if l else _fail("element of an empty list"),
    "slice": _slice,
    "trimprefix": lambda s, p: (_not_null("trimprefix", s, p), s[len(p):] if s.startswith(p) else s)[1],
    "startswith": lambda s, p: (_not_null("startswith", s, p), s.startswith(p))[1],
    "endswith": lambda s, p: (_not_null("endswith", s, p), s.endswith(p))[1],
    "strcontains": lambda s, p: (_not_null("strcontains", s, p), p in s)[1],
    "contains": lambda l, v: any(_equal(x, v) for x in l),
    "alltrue": lambda l: all(x is True or x == "true" for x in l),
    "anytrue": lambda l: any(x is True or x == "true" for x in l),
    "regex": lambda p, s: (_not_null("regex", p, s), _regex(p, s))[1],
    "cidrhost": lambda p, n: (_not_null("cidrhost", p, n), _cidrhost(p, to_number(n)))[1],
    "floor": lambda n: math.floor(to_number(n)),
    "max": lambda *ns: max(to_number(n) for n in ns),
    "min": lambda *ns: min(to_number(n) for n in ns),
    "coalesce": lambda *xs: next((x for x in xs if x not in (None, "")), _Missing) if any(x not in (None, "") for x in xs) else _fail("coalesce: no non-null argument"),
    "one": lambda l: (l[0] if len(l) == 1 else None) if len(l) <= 1 else _fail("one: more than one element"),
    "base64encode": lambda s: __import__("base64").b64encode(s.encode()).decode(),
}


class Scope:
    """Names visible to an expression: roots (var, local, path, data, aws_* resources, ...) and
    loop variables of enclosing for-expressions and %{ for } directives."""

    def __init__(self, roots: dict, base_dir: Path, parent: "Scope | None" = None, names: dict | None = None):
        self.roots = roots
        self.base_dir = base_dir
        self.parent = parent
        self.names = names or {}

    def child(self, names: dict) -> "Scope":
        return Scope(self.roots, self.base_dir, self, names)

    def lookup(self, name):
        s = self
        while s is not None:
            if name in s.names:
                return s.names[name]
            s = s.parent
        if name in self.roots:
            return self.roots[name]
        raise EvalError(f"unknown name {name!r}")


def _get_attr(v, name):
    if v is None:
        raise EvalError(f"attempt to get attribute {name!r} from a null value")
    if isinstance(v, _Lazy):
        return v[name]
    if isinstance(v, dict):
        if name not in v:
            raise EvalError(f"no attribute {name!r} (have {sorted(v)})")
        return v[name]
    raise EvalError(f"cannot get attribute {name!r} of {type(v).__name__}")


def evaluate(ast, scope: Scope):
    kind = ast[0]
    if kind == "lit":
        return ast[1]
    if kind == "tmpl":
        parts = ast[1]
        # A template that is only "${expr}" yields the expression's value unconverted.
        if len(parts) == 1 and parts[0][0] == "interp":
            return evaluate(parts[0][1], scope)
        return render_parts(parts, scope)
    if kind == "ref":
        return scope.lookup(ast[1])
    if kind == "attr":
        return _get_attr(evaluate(ast[1], scope), ast[2])
    if kind == "index":
        base = evaluate(ast[1], scope)
        idx = evaluate(ast[2], scope)
        if base is None:
            raise EvalError("index of null")
        if isinstance(base, list):
            i = to_number(idx)
            if not isinstance(i, int) or not 0 <= i < len(base):
                raise EvalError(f"index {idx!r} out of range")
            return base[i]
        return _get_attr(base, to_string(idx))
    if kind == "splat":
        base = evaluate(ast[1], scope)
        items = [] if base is None else (base if isinstance(base, list) else [base])
        out = []
        for it in items:
            for name in ast[2]:
                it = _get_attr(it, name)
            out.append(it)
        return out
    if kind == "call":
        name, args = ast[1], ast[2]
        if name == "can":
            try:
                evaluate(args[0], scope)
                return True
            except EvalError:
                return False
        if name == "try":
            for a in args:
                try:
                    return evaluate(a, scope)
                except EvalError:
                    continue
            raise EvalError("try: no argument succeeded")
        if name == "templatefile":
            path = to_string(evaluate(args[0], scope))
            variables = evaluate(args[1], scope)
            return templatefile(Path(path), variables)
        if name not in FUNCTIONS:
            raise Unsupported(f"function {name}()")
        vals = [evaluate(a, scope) for a in args]
        try:
            return FUNCTIONS[name](*vals)
        except (EvalError, Unsupported):
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError) as e:
            raise EvalError(f"{name}(): {e}") from None
    if kind == "tuple":
        return [evaluate(e, scope) for e in ast[1]]
    if kind == "object":
        out = {}
        for k, v in ast[1]:
            out[to_string(evaluate(k, scope))] = evaluate(v, scope)
        return out
    if kind == "not":
        v = evaluate(ast[1], scope)
        if not isinstance(v, bool):
            raise EvalError("! needs a bool")
        return not v
    if kind == "neg":
        return -to_number(evaluate(ast[1], scope))
    if kind == "cond":
        c = evaluate(ast[1], scope)
        if not isinstance(c, bool):
            raise EvalError(f"condition is not a bool: {c!r}")
        return evaluate(ast[2] if c else ast[3], scope)
    if kind == "bin":
        op = ast[1]
        a = evaluate(ast[2], scope)
        b = evaluate(ast[3], scope)
        if op in ("&&", "||"):
            if not isinstance(a, bool) or not isinstance(b, bool):
                raise EvalError(f"{op} needs bools")
            return (a and b) if op == "&&" else (a or b)
        if op == "==":
            return _equal(a, b)
        if op == "!=":
            return not _equal(a, b)
        x, y = to_number(a), to_number(b)
        if op == "<":
            return x < y
        if op == "<=":
            return x <= y
        if op == ">":
            return x > y
        if op == ">=":
            return x >= y
        if op == "+":
            return _norm_num(x + y)
        if op == "-":
            return _norm_num(x - y)
        if op == "*":
            return _norm_num(x * y)
        if op == "/":
            if y == 0:
                raise EvalError("division by zero")
            return _norm_num(x / y)
        if op == "%":
            return _norm_num(x % y)
    if kind == "for":
        _, close, key_var, val_var, coll_ast, kexpr, vexpr, cond = ast
        coll = evaluate(coll_ast, scope)
        out_list, out_map = [], {}
        for k, v in _iterate(coll):
            names = {val_var: v}
            if key_var:
                names[key_var] = k
            s = scope.child(names)
            if cond is not None:
                c = evaluate(cond, s)
                if not isinstance(c, bool):
                    raise EvalError("for-expression condition is not a bool")
                if not c:
                    continue
            if close == "]":
                out_list.append(evaluate(vexpr, s))
            else:
                key = to_string(evaluate(kexpr, s))
                if key in out_map:
                    raise EvalError(f"duplicate key {key!r} in for expression")
                out_map[key] = evaluate(vexpr, s)
        return out_list if close == "]" else out_map
    raise Unsupported(f"expression kind {kind}")


def render_parts(parts, scope: Scope) -> str:
    out = []
    for p in parts:
        if p[0] == "lit":
            out.append(p[1])
        elif p[0] == "interp":
            out.append(to_string(evaluate(p[1], scope)))
        elif p[0] == "if":
            c = evaluate(p[1], scope)
            if not isinstance(c, bool):
                raise EvalError(f"%{{ if }} condition is not a bool: {c!r}")
            out.append(render_parts(p[2] if c else p[3], scope))
        elif p[0] == "tfor":
            _, key_var, val_var, coll_ast, body = p
            for k, v in _iterate(evaluate(coll_ast, scope)):
                names = {val_var: v}
                if key_var:
                    names[key_var] = k
                out.append(render_parts(body, scope.child(names)))
        else:
            raise Unsupported(p[0])
    return "".join(out)


def templatefile(path: Path, variables: dict) -> str:
    """Terraform's templatefile(): only the given variables are visible (no var./local.)."""
    if not isinstance(variables, dict):
        raise EvalError("templatefile needs an object of variables")
    for k in variables:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", k):
            raise EvalError(f"invalid template variable name {k!r}")
    parts = parse_template(Path(path).read_text())
    return render_parts(parts, Scope({}, Path(path).parent, names=dict(variables)))


def template_references(path: Path) -> set[str]:
    """The root names a template file refers to (minus its own loop variables)."""
    parts = parse_template(Path(path).read_text())
    refs: set[str] = set()

    def walk_ast(a, bound):
        if isinstance(a, tuple):
            if a and a[0] == "ref" and a[1] not in bound:
                refs.add(a[1])
            elif a and a[0] == "for":
                _, _, kv, vv, coll, ke, ve, c = a
                walk_ast(coll, bound)
                inner = bound | {x for x in (kv, vv) if x}
                for x in (ke, ve, c):
                    walk_ast(x, inner)
                return
            elif a and a[0] == "tmpl":
                walk_parts(a[1], bound)
                return
            for x in a[1:]:
                walk_ast(x, bound)
        elif isinstance(a, list):
            for x in a:
                walk_ast(x, bound)

    def walk_parts(ps, bound):
        for p in ps:
            if p[0] == "interp":
                walk_ast(p[1], bound)
            elif p[0] == "if":
                walk_ast(p[1], bound)
                walk_parts(p[2], bound)
                walk_parts(p[3], bound)
            elif p[0] == "tfor":
                walk_ast(p[3], bound)
                walk_parts(p[4], bound | {x for x in (p[1], p[2]) if x})

    walk_parts(parts, set())
    return refs


# ----------------------------------------------------------------------------------------------
# Types


def parse_type(src: str):
    return _type_from_ast(parse_expr(src))


def _type_from_ast(a):
    if a[0] == "ref" and a[1] in ("string", "number", "bool", "any"):
        return (a[1],)
    if a[0] == "call":
        name, args = a[1], a[2]
        if name in ("list", "set", "map") and len(args) == 1:
            return (name, _type_from_ast(args[0]))
        if name == "object" and len(args) == 1 and args[0][0] == "object":
            attrs = {}
            for k, v in args[0][1]:
                key = k[1]
                if v[0] == "call" and v[1] == "optional":
                    default = evaluate(v[2][1], Scope({}, Path("."))) if len(v[2]) > 1 else None
                    attrs[key] = (_type_from_ast(v[2][0]), True, default)
                else:
                    attrs[key] = (_type_from_ast(v), False, None)
            return ("object", attrs)
        if name == "tuple" and len(args) == 1 and args[0][0] == "tuple":
            return ("tuple", [_type_from_ast(x) for x in args[0][1]])
    raise Unsupported(f"type expression {a}")


def convert(value, ty, where="value"):
    kind = ty[0]
    if value is None:
        return None
    if kind == "any":
        return value
    if kind == "string":
        if isinstance(value, (str, bool, int, float)):
            return to_string(value)
        raise EvalError(f"{where}: string required, got {value!r}")
    if kind == "number":
        try:
            return to_number(value)
        except EvalError:
            raise EvalError(f"{where}: number required, got {value!r}") from None
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return value == "true"
        raise EvalError(f"{where}: bool required, got {value!r}")
    if kind in ("list", "set"):
        if not isinstance(value, list):
            raise EvalError(f"{where}: list required, got {value!r}")
        out = [convert(v, ty[1], f"{where}[{i}]") for i, v in enumerate(value)]
        return _toset(out) if kind == "set" else out
    if kind == "tuple":
        if not isinstance(value, list) or len(value) != len(ty[1]):
            raise EvalError(f"{where}: tuple of {len(ty[1])} required")
        return [convert(v, t, f"{where}[{i}]") for i, (v, t) in enumerate(zip(value, ty[1]))]
    if kind == "map":
        if not isinstance(value, dict):
            raise EvalError(f"{where}: map required, got {value!r}")
        return {k: convert(v, ty[1], f"{where}[{k!r}]") for k, v in value.items()}
    if kind == "object":
        if not isinstance(value, dict):
            raise EvalError(f"{where}: object required, got {value!r}")
        extra = set(value) - set(ty[1])
        if extra:
            raise EvalError(f"{where}: attributes not in the type: {sorted(extra)}")
        out = {}
        for name, (aty, optional, default) in ty[1].items():
            if name in value:
                v = convert(value[name], aty, f"{where}.{name}")
                out[name] = convert(default, aty, f"{where}.{name}") if v is None and default is not None else v
            elif optional:
                out[name] = convert(default, aty, f"{where}.{name}")
            else:
                raise EvalError(f"{where}: attribute {name!r} is required")
        return out
    raise Unsupported(f"type {ty}")


# ----------------------------------------------------------------------------------------------
# Terraform files and modules

OPTIONS = SerializationOptions(wrap_objects=True, wrap_tuples=True, preserve_heredocs=False, with_comments=True)


def load_hcl(path: Path) -> dict:
    """Parsed with python-hcl2; cached per file version (the parser is slow, the tests reload)."""
    p = Path(path).resolve()
    return _load_hcl_cached(str(p), p.stat().st_mtime_ns)


@functools.lru_cache(maxsize=None)
def _load_hcl_cached(path: str, _mtime: int) -> dict:
    with open(path) as f:
        return hcl2.load(f, serialization_options=OPTIONS)


def expr_source(v) -> str:
    """The HCL source of an attribute value as python-hcl2 serializes it."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if v is None:
        return "null"
    if isinstance(v, str):
        if v.startswith("${") and v.endswith("}"):
            return v[2:-1]
        if v.startswith('"'):
            return v
        # bare keywords and references (string, number, null) come through unwrapped
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", v):
            return v
    raise Unsupported(f"attribute value {v!r}")


def unquote(label: str) -> str:
    return label[1:-1] if label.startswith('"') and label.endswith('"') else label


class _Lazy(dict):
    """A mapping whose values are computed on first access (locals, module calls)."""

    def __init__(self, compute, names):
        super().__init__()
        self._compute = compute
        self._names = set(names)
        self._busy: set = set()

    def __contains__(self, k):
        return k in self._names

    def __getitem__(self, k):
        if k not in self._names:
            raise EvalError(f"no attribute {k!r}")
        if not dict.__contains__(self, k):
            if k in self._busy:
                raise EvalError(f"cycle through {k!r}")
            self._busy.add(k)
            try:
                dict.__setitem__(self, k, self._compute(k))
            finally:
                self._busy.discard(k)
        return dict.__getitem__(self, k)


class Module:
    """One directory of .tf files."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.files = {p.name: load_hcl(p) for p in sorted(self.path.glob("*.tf"))}
        self.variables: dict[str, dict] = {}
        self.outputs: dict[str, dict] = {}
        self.locals: dict[str, object] = {}
        self.resources: dict[tuple[str, str], dict] = {}
        self.data: dict[tuple[str, str], dict] = {}
        self.module_calls: dict[str, dict] = {}
        for d in self.files.values():
            for block in d.get("variable", []):
                for name, body in block.items():
                    self.variables[unquote(name)] = body
            for block in d.get("output", []):
                for name, body in block.items():
                    self.outputs[unquote(name)] = body
            for block in d.get("locals", []):
                for k, v in block.items():
                    if not k.startswith("__"):
                        self.locals[k] = v
            for kind, target in (("resource", self.resources), ("data", self.data)):
                for block in d.get(kind, []):
                    for rtype, named in block.items():
                        for rname, body in named.items():
                            target[(unquote(rtype), unquote(rname))] = body
            for block in d.get("module", []):
                for name, body in block.items():
                    self.module_calls[unquote(name)] = body

    def text(self, exclude: tuple[str, ...] = ()) -> str:
        return "\n".join(p.read_text() for p in sorted(self.path.glob("*.tf")) if p.name not in exclude)

    def variable_type(self, name):
        t = self.variables[name].get("type")
        return parse_type(expr_source(t)) if t is not None else ("any",)

    def input_values(self, given: dict) -> dict:
        """Variable values as Terraform sees them: given values or defaults, converted to the
        declared types. A required variable without a value is an error."""
        out = {}
        unknown = set(given) - set(self.variables)
        if unknown:
            raise EvalError(f"{self.path}: no such variables {sorted(unknown)}")
        for name, body in self.variables.items():
            if name in given:
                v = given[name]
            elif "default" in body:
                v = evaluate(parse_expr(expr_source(body["default"])), Scope({}, self.path))
            else:
                raise EvalError(f"{self.path}: variable {name!r} is required")
            out[name] = convert(v, self.variable_type(name), f"var.{name}")
        return out

    def scope(self, inputs: dict, stubs: dict | None = None) -> Scope:
        """A scope with var., local., path. and the given stubs (data sources, resources and
        module outputs only known after apply) as roots."""
        roots: dict = {"var": self.input_values(inputs), "path": {"module": str(self.path), "root": str(self.path)}}
        for k, v in (stubs or {}).items():
            roots[k] = v
        scope = Scope(roots, self.path)

        def compute_local(name):
            return evaluate(parse_expr(expr_source(self.locals[name])), scope)

        roots["local"] = _Lazy(compute_local, self.locals)
        return scope

    def eval(self, value, scope: Scope):
        return evaluate(parse_expr(expr_source(value)), scope)

    def check_variable_validations(self, scope: Scope) -> list[str]:
        """Evaluates every variable validation against the scope's inputs; returns failures."""
        failures = []
        for name, body in self.variables.items():
            for v in body.get("validation", []):
                ok = self.eval(v["condition"], scope)
                if ok is not True:
                    failures.append(f"var.{name}: {self.eval(v['error_message'], scope)}")
        return failures

    def check_preconditions(self, scope: Scope) -> list[str]:
        failures = []
        for (rtype, rname), body in self.resources.items():
            for lc in body.get("lifecycle", []):
                for pc in lc.get("precondition", []):
                    if self.eval(pc["condition"], scope) is not True:
                        failures.append(f"{rtype}.{rname}: {self.eval(pc['error_message'], scope)}")
        return failures


def checkov_skips(path: Path) -> list[tuple[str, str]]:
    """(check id, reason) of every inline `#checkov:skip=` comment in the .tf files below path."""
    out = []
    for p in sorted(Path(path).rglob("*.tf")):
        for line in p.read_text().splitlines():
            m = re.search(r"#\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?", line)
            if m:
                out.append((m.group(1), (m.group(2) or "").strip(), f"{p}"))
    return out


def meshgate_binary(repo: Path, name: str = "meshgate") -> Path:
    p = repo / "target" / "debug" / name
    if not os.access(p, os.X_OK):
        raise FileNotFoundError(
            f"{p} is missing: run `cargo build` (scripts/test.sh runs `cargo test --workspace` first)"
        )
    return p


# ----------------------------------------------------------------------------------------------
# An offline "plan": the example's tfvars through the module calls into each module's scope.

# Values of attributes that only exist after apply, for resources the tests follow through
# outputs. Plausible shapes, so validations that check formats behave as with real ids.
COMPUTED = {
    ("aws_lb", "dns_name"): "internal-meshgate-0123456789.elb.{region}.amazonaws.com",
    ("aws_lb", "zone_id"): "Z2IFOLAFXWLO4F",
    ("aws_lb", "arn"): "arn:aws:elasticloadbalancing:{region}:111122223333:loadbalancer/net/meshgate/0123456789abcdef",
    ("aws_autoscaling_group", "arn"): "arn:aws:autoscaling:{region}:111122223333:autoScalingGroup:00000000-0000-4000-8000-000000000000:autoScalingGroupName/{name}",
    ("aws_security_group", "id"): "sg-0fa1e2d3c4b5a6978",
    ("aws_iam_role", "name"): "meshgate-20260101000000000000000001",
}


class ResourceView(_Lazy):
    """A resource as other expressions see it: configured arguments evaluated in the module's
    scope, computed attributes from COMPUTED."""

    def __init__(self, module: "Module", rtype: str, body: dict, scope_fn, region: str):
        names = {k for k in body if not k.startswith("__")} | {a for (t, a) in COMPUTED if t == rtype}

        def compute(attr):
            if attr in body and not isinstance(body[attr], list):
                return module.eval(body[attr], scope_fn())
            if (rtype, attr) in COMPUTED:
                cfg_name = module.eval(body["name"], scope_fn()) if "name" in body else "x"
                return COMPUTED[(rtype, attr)].format(region=region, name=cfg_name)
            raise EvalError(f"{rtype}: attribute {attr!r} is not modelled")

        super().__init__(compute, names)


class Deployment:
    """The example root module evaluated offline: its variables from terraform.tfvars (plus
    overrides), each module call's arguments, and every child module's scope with its own
    resources and data sources stubbed."""

    def __init__(self, example_dir: Path, tfvars: dict, subnet_cidrs: dict, account_id="111122223333",
                 module_overrides: dict | None = None):
        self.root = Module(example_dir)
        self.root_inputs = tfvars
        self.subnet_cidrs = subnet_cidrs
        self.account_id = account_id
        self.module_overrides = module_overrides or {}
        self.root_scope = self.root.scope(tfvars)
        self.region = self.root_scope.roots["var"]["region"]
        self.children: dict[str, Module] = {}
        self._scopes: dict[str, Scope] = {}
        self.root_scope.roots["module"] = _Lazy(self._outputs_of, self.root.module_calls)

    def child(self, call: str) -> Module:
        if call not in self.children:
            src = unquote(self.root.module_calls[call]["source"])
            self.children[call] = Module((self.root.path / src).resolve())
        return self.children[call]

    def inputs(self, call: str) -> dict:
        body = self.root.module_calls[call]
        meta = {"source", "version", "providers", "depends_on", "count", "for_each"}
        out = {k: self.root.eval(v, self.root_scope) for k, v in body.items() if k not in meta and not k.startswith("__")}
        out.update(self.module_overrides.get(call, {}))
        return out

    def scope(self, call: str) -> Scope:
        if call not in self._scopes:
            mod = self.child(call)
            stubs = {
                "data": {
                    "aws_region": {"current": {"name": self.region}},
                    "aws_partition": {"current": {"partition": "aws"}},
                    "aws_caller_identity": {"current": {"account_id": self.account_id}},
                    "aws_subnet": {"this": {sid: {"cidr_block": cidr, "id": sid} for sid, cidr in self.subnet_cidrs.items()}},
                },
            }
            scope = mod.scope(self.inputs(call), stubs)
            for (rtype, rname), body in mod.resources.items():
                if "count" in body or "for_each" in body:
                    continue
                scope.roots.setdefault(rtype, {})[rname] = ResourceView(mod, rtype, body, lambda s=scope: s, self.region)
            self._scopes[call] = scope
        return self._scopes[call]

    def _outputs_of(self, call: str):
        mod = self.child(call)
        return _Lazy(lambda name: mod.eval(mod.outputs[name]["value"], self.scope(call)), mod.outputs)

    def local(self, call: str, name: str):
        return self.scope(call).roots["local"][name]

    def resource(self, call: str, rtype: str, rname: str) -> dict:
        return self.child(call).resources[(rtype, rname)]

    def eval_in(self, call: str, value, extra: dict | None = None):
        scope = self.scope(call)
        if extra:
            scope = scope.child(extra)
        return self.child(call).eval(value, scope)

    def block(self, call: str, rtype: str, rname: str, block: str) -> dict:
        """A nested block of a resource (the first), its attributes evaluated."""
        body = self.resource(call, rtype, rname)[block][0]
        return {k: self.eval_in(call, v) for k, v in body.items() if not k.startswith("__") and not isinstance(v, list)}

    def for_each_keys(self, call: str, rtype: str, rname: str) -> list:
        v = self.eval_in(call, self.resource(call, rtype, rname)["for_each"])
        return sorted(v) if isinstance(v, dict) else list(v)

    def count(self, call: str, rtype: str, rname: str) -> int:
        body = self.resource(call, rtype, rname)
        return self.eval_in(call, body["count"]) if "count" in body else 1

    def policy_statements(self, call: str, data_name: str) -> list[dict]:
        """The statements of an aws_iam_policy_document data source, dynamic ones expanded."""
        body = self.child(call).data[("aws_iam_policy_document", data_name)]
        out = []
        for st in body.get("statement", []):
            out.append({k: self.eval_in(call, v) for k, v in st.items() if not k.startswith("__") and not isinstance(v, list)})
        for dyn in body.get("dynamic", []):
            for label, spec in dyn.items():
                if unquote(label) != "statement":
                    continue
                for key, val in _iterate(self.eval_in(call, spec["for_each"])):
                    it = {"statement": {"key": key, "value": val}}
                    content = spec["content"][0]
                    st = {k: self.eval_in(call, v, it) for k, v in content.items() if not k.startswith("__") and not isinstance(v, list)}
                    if "condition" in content:
                        st["condition"] = [{k: self.eval_in(call, v, it) for k, v in c.items() if not k.startswith("__")} for c in content["condition"]]
                    out.append(st)
        return out

    def check_all(self, call: str) -> list[str]:
        """Variable validations and resource preconditions of a module call, evaluated."""
        mod = self.child(call)
        scope = self.scope(call)
        failures = mod.check_variable_validations(scope)
        for (rtype, rname), body in mod.resources.items():
            conds = [pc for lc in body.get("lifecycle", []) for pc in lc.get("precondition", [])]
            if not conds:
                continue
            if "for_each" in body:
                coll = mod.eval(body["for_each"], scope)
                instances = [{"each": {"key": k if isinstance(coll, dict) else v, "value": v}} for k, v in _iterate(coll)]
            elif "count" in body:
                instances = [{"count": {"index": i}} for i in range(mod.eval(body["count"], scope))]
            else:
                instances = [{}]
            for names in instances:
                s = scope.child(names)
                for pc in conds:
                    if mod.eval(pc["condition"], s) is not True:
                        failures.append(f"{rtype}.{rname}: {mod.eval(pc['error_message'], s)}")
        return failures


def load_hcl_text(text: str) -> dict:
    return hcl2.loads(text, serialization_options=OPTIONS)
