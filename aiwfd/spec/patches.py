"""An incremental JSON parser that turns a streamed answer into `patch` ops (SPEC §7.4).

    parser = PatchParser(output_type, defs)
    parser.feed('{"items": [{"ti')   -> [{"op": "add", "path": "", "value": {"items": [{}]}}]
    parser.feed('tle": "Hel')        -> [{"op": "add", "path": "/items/0/title", "value": "Hel"}]
    parser.feed('lo"}')              -> [{"op": "append", "path": "/items/0/title", "value": "lo"}]

Applying every op in order to `null` gives, after each piece, what jiter's
partial mode ("trailing-strings") makes of the text so far: open strings,
arrays and objects included, an unfinished key or literal left out. One
difference, on purpose: a number is added when it ends (jiter shows `10` of
what becomes `1001`), as any unfinished literal is.

Each character is read once and the parser keeps only a stack of the open
containers (their paths, the keys they hold, their schema nodes) and the token
being read, so a stream's cost grows with the answer's length, not its square.

The ops of one piece are folded: a container opened in this piece is sent
whole with what the piece put in it, and a string's pieces are joined. A key
seen twice is a `replace` (the one use of it). Optional fields the model sent
as `null` (strict mode sends them) are never added, as `drop_nulls` removes
them from `result`.

The parser is fed the deltas as text: a model's deltas are JSON strings, so
a code point is never split, but an escape (`\\u00e9`, a surrogate pair
written as two escapes) can be, and is held until it is whole. Once the text
stops being JSON (or is not an object at the top), the parser sends nothing
more for the attempt: the engine's own parse of the whole answer decides what
happens to it.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, cast

from aiwfd.spec.typedsl import Array, Map, Node, Obj, deref

Op = dict[str, Any]

# What a piece of a string holds between escapes and its end.
_RUN = re.compile(r'[^"\\\x00-\x1f]+')
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_WS = frozenset(" \t\r\n")
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_LITERALS: dict[str, tuple[str, Any]] = {"t": ("true", True), "f": ("false", False), "n": ("null", None)}
_HEX = frozenset("0123456789abcdefABCDEF")

# Parser states.
_VALUE = 0         # a value is due (after `:` or `,` in an array, or at the top)
_STRING = 1        # inside a string value
_KEY = 2           # inside a key
_NUMBER_ = 3       # inside a number
_LITERAL = 4       # inside true/false/null
_KEY_OR_END = 5    # just after `{`
_KEY_START = 6     # after `,` in an object
_COLON = 7         # after a key
_AFTER = 8         # after a value: `,` or the container's end
_VALUE_OR_END = 9  # just after `[`
_DONE = 10         # the top-level object ended
_FAILED = 11       # not JSON any more: nothing more is sent


def pointer_token(key: str) -> str:
    """`key` as one JSON Pointer reference token (RFC 6901)."""
    if "~" in key or "/" in key:
        return key.replace("~", "~0").replace("/", "~1")
    return key


class _Frame:
    """An open container: where it is, what the client's copy of it holds so far."""

    __slots__ = ("obj", "path", "node", "keys", "key", "count", "fresh")

    def __init__(self, obj: bool, path: str, node: Node | None, fresh: Any) -> None:
        self.obj = obj
        self.path = path
        # The schema node (Obj or Map for an object, Array for an array) whose
        # optional fields lose their nulls; None: nothing below is cleaned.
        self.node = node
        self.keys: set[str] = set()  # the keys the client's copy has
        self.key = ""                # the key whose value is being read
        self.count = 0               # the client's copy's length (arrays)
        # The container as it stands in an op of the current piece: what the
        # piece adds below goes into it rather than into ops of its own.
        self.fresh = fresh


class PatchParser:
    """Reads an answer piece by piece; `feed` answers the ops each piece makes."""

    def __init__(self, node: Node | None, defs: Mapping[str, Node]) -> None:
        # deref only looks names up: the config's own mapping, not a copy per stream.
        self._defs = cast("dict[str, Node]", defs)
        self._root = deref(node, self._defs) if node is not None else None
        self._fields: dict[int, dict[str, tuple[Node, bool]]] = {}
        self._stack: list[_Frame] = []
        self._state = _VALUE
        self._ops: list[Op] = []
        self._token = ""            # the number or literal being read
        self._esc = ""              # an escape cut short by the end of a piece
        self._key_parts: list[str] = []
        self._high = 0              # a high surrogate waiting for its low half
        self._str_path = ""         # the string value being read
        self._holder: Any = None    # where its next characters go in this piece's ops
        self._slot: Any = None

    @property
    def failed(self) -> bool:
        return self._state == _FAILED

    def feed(self, text: str) -> list[Op]:
        """The ops `text`, the next piece of the answer, makes; [] when none."""
        if self._state >= _DONE:
            return []
        ops = self._ops = []
        for f in self._stack:
            f.fresh = None
        self._holder = None
        i, n = 0, len(text)
        while i < n:
            st = self._state
            if st == _STRING or st == _KEY:
                i = self._string(text, i, n)
                continue
            c = text[i]
            if st == _NUMBER_:
                if c in _NUMBER_CHARS:
                    self._token += c
                    i += 1
                    continue
                self._end_number()
                continue  # `c` ends the number: read it again in the new state
            if c in _WS:
                i += 1
                if st == _LITERAL:
                    self._state = _FAILED
                continue
            i += 1
            if st == _AFTER:
                top = self._stack[-1]
                if c == ",":
                    self._state = _KEY_START if top.obj else _VALUE
                elif c == ("}" if top.obj else "]"):
                    self._close()
                else:
                    self._state = _FAILED
            elif st == _LITERAL:
                self._literal(c)
            elif st == _VALUE or st == _VALUE_OR_END:
                if c == "]" and st == _VALUE_OR_END:
                    self._close()
                else:
                    self._value(c)
            elif st == _COLON:
                self._state = _VALUE if c == ":" else _FAILED
            elif st == _KEY_OR_END or st == _KEY_START:
                if c == '"':
                    self._state = _KEY
                    self._key_parts = []
                elif c == "}" and st == _KEY_OR_END:
                    self._close()
                else:
                    self._state = _FAILED
            if self._state >= _DONE:
                break
        # A piece that fails part-way still made true ops up to that point.
        return ops

    # ------------------------------------------------------------------ values

    def _value(self, c: str) -> None:
        if c == "{" or c == "[":
            obj = c == "{"
            if not self._stack and not obj:
                self._state = _FAILED  # object outputs only
                return
            node = self._child()
            if node is not None and not (isinstance(node, (Obj, Map)) if obj else isinstance(node, Array)):
                node = None  # not what the type says: drop_nulls leaves it as it is
            container: Any = {} if obj else []
            placed = self._put(container)
            assert placed is not None
            self._stack.append(_Frame(obj, placed, node, container))
            self._state = _KEY_OR_END if obj else _VALUE_OR_END
        elif not self._stack:
            self._state = _FAILED
        elif c == '"':
            path = self._put("")
            assert path is not None
            self._str_path = path
            self._state = _STRING
        elif c == "-" or "0" <= c <= "9":
            self._token = c
            self._state = _NUMBER_
        elif c in _LITERALS:
            self._token = c
            self._state = _LITERAL
        else:
            self._state = _FAILED

    def _literal(self, c: str) -> None:
        word, value = _LITERALS[self._token[0]]
        token = self._token + c
        if not word.startswith(token):
            self._state = _FAILED
        elif len(token) < len(word):
            self._token = token
        else:
            self._state = _AFTER
            self._put(value)

    def _end_number(self) -> None:
        token = self._token
        m = _NUMBER.fullmatch(token)
        if m is None:
            self._state = _FAILED
            return
        try:
            value: Any = float(token) if (m.group(1) or m.group(2)) else int(token)
        except ValueError:  # more digits than int() takes
            self._state = _FAILED
            return
        if value in (float("inf"), float("-inf")):
            self._state = _FAILED
            return
        self._state = _AFTER
        self._put(value)

    def _close(self) -> None:
        self._stack.pop()
        self._state = _AFTER if self._stack else _DONE

    def _child(self) -> Node | None:
        """The schema node of the value starting in the top container."""
        if not self._stack:
            return self._root
        f = self._stack[-1]
        node = f.node
        if isinstance(node, Obj):
            field = self._fields_of(node).get(f.key)
            return field[0] if field is not None else None
        if isinstance(node, Map):
            return deref(node.value, self._defs)
        if isinstance(node, Array):
            return deref(node.item, self._defs)
        return None

    def _fields_of(self, node: Obj) -> dict[str, tuple[Node, bool]]:
        fields = self._fields.get(id(node))
        if fields is None:
            fields = self._fields[id(node)] = {
                f.name: (deref(f.type, self._defs), f.optional) for f in node.fields}
        return fields

    def _put(self, value: Any) -> str | None:
        """Add `value` where the top container's next value goes; its path, or
        None when it is an optional field's null (left out)."""
        stack = self._stack
        if not stack:
            op = {"op": "add", "path": "", "value": value}
            self._ops.append(op)
            self._holder, self._slot = op, "value"
            return ""
        f = stack[-1]
        if f.obj:
            key = f.key
            path = f.path + "/" + pointer_token(key)
            if value is None and isinstance(f.node, Obj):
                field = self._fields_of(f.node).get(key)
                if field is not None and field[1]:
                    if key in f.keys:  # a duplicate key: null replaces a value the client has
                        if f.fresh is None:
                            self._state = _FAILED  # would need `remove`, which §7.4 does not have
                        else:
                            del f.fresh[key]
                            f.keys.discard(key)
                    return None
            if f.fresh is not None:
                f.fresh[key] = value
                self._holder, self._slot = f.fresh, key
            else:
                op = {"op": "replace" if key in f.keys else "add", "path": path, "value": value}
                self._ops.append(op)
                self._holder, self._slot = op, "value"
            f.keys.add(key)
            return path
        index = f.count
        f.count = index + 1
        path = f.path + "/" + str(index)
        if f.fresh is not None:
            f.fresh.append(value)
            self._holder, self._slot = f.fresh, index
        else:
            op = {"op": "add", "path": path, "value": value}
            self._ops.append(op)
            self._holder, self._slot = op, "value"
        return path

    # ----------------------------------------------------------------- strings

    def _string(self, text: str, i: int, n: int) -> int:
        """Read string characters from `i`; the position after them."""
        if self._esc:  # an escape cut short by the last piece
            i = self._escape(text, i, n)
            if i >= n or self._state == _FAILED:
                return i
        m = _RUN.match(text, i)
        if m is not None:
            if self._high:
                self._state = _FAILED  # a high surrogate not followed by its low half
                return n
            self._chars(m.group())
            i = m.end()
            if i >= n:
                return i
        c = text[i]
        if c == '"':
            if self._high:
                self._state = _FAILED
                return n
            if self._state == _KEY:
                self._stack[-1].key = "".join(self._key_parts)
                self._state = _COLON
            else:
                self._state = _AFTER
            return i + 1
        if c == "\\":
            self._esc = "\\"
            return self._escape(text, i + 1, n)
        self._state = _FAILED  # a raw control character
        return n

    def _escape(self, text: str, i: int, n: int) -> int:
        token = self._esc
        while i < n:
            token += text[i]
            i += 1
            if len(token) == 2:
                if token[1] == "u":
                    continue
                char = _ESCAPES.get(token[1])
                self._esc = ""
                if char is None or self._high:
                    self._state = _FAILED
                    return n
                self._chars(char)
                return i
            if text[i - 1] not in _HEX:
                self._state = _FAILED
                return n
            if len(token) == 6:
                self._esc = ""
                self._code(int(token[2:], 16))
                return i
        self._esc = token
        return i

    def _code(self, code: int) -> None:
        if 0xD800 <= code <= 0xDBFF:
            if self._high:
                self._state = _FAILED
            self._high = code
        elif 0xDC00 <= code <= 0xDFFF:
            if not self._high:
                self._state = _FAILED
                return
            self._chars(chr(0x10000 + ((self._high - 0xD800) << 10) + (code - 0xDC00)))
            self._high = 0
        elif self._high:
            self._state = _FAILED
        else:
            self._chars(chr(code))

    def _chars(self, s: str) -> None:
        if self._state == _KEY:
            self._key_parts.append(s)
        elif self._holder is not None:
            self._holder[self._slot] += s
        else:
            op = {"op": "append", "path": self._str_path, "value": s}
            self._ops.append(op)
            self._holder, self._slot = op, "value"
