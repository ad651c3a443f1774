"""Apply the `patch` events of `POST /agent/{name}/stream` (docs/api.md#streaming).

    doc = None
    doc = apply(doc, [{"op": "add", "path": "", "value": {"items": []}}])
    doc = apply(doc, [{"op": "add", "path": "/items/0", "value": {"title": "Hel"}},
                      {"op": "append", "path": "/items/0/title", "value": "lo"}])
    # doc == {"items": [{"title": "Hello"}]}

`add` and `replace` are RFC 6902's, `append` concatenates its value to the
string at `path`; paths are RFC 6901 JSON Pointers. Standard library only:
copy this file into a client as it is.
"""

from __future__ import annotations

from typing import Any


def apply(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """`doc` changed by `ops`, in order. Containers are changed in place, but the
    root can be replaced (path ""), so always use the returned document."""
    for op in ops:
        kind, path, value = op["op"], op["path"], op.get("value")
        if path == "":
            doc = doc + value if kind == "append" else value
            continue
        # "~1" before "~0" (RFC 6901 §4): "~01" is the key "~1", not "/".
        *parents, last = [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]
        target = doc
        for token in parents:
            target = target[int(token)] if isinstance(target, list) else target[token]
        if isinstance(target, list):
            index = len(target) if last == "-" else int(last)
            if kind == "add":
                target.insert(index, value)
            else:
                target[index] = target[index] + value if kind == "append" else value
        else:
            target[last] = target[last] + value if kind == "append" else value
    return doc
