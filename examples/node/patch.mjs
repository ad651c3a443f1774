// @ts-check
// Apply the `patch` events of `POST /agent/{name}/stream` (docs/api.md#streaming).
// No dependencies: copy this file into a client (browser or Node) as it is.
//
//   let doc = null;
//   doc = apply(doc, [{ op: "add", path: "", value: { items: [] } }]);
//   doc = apply(doc, [{ op: "add", path: "/items/0", value: { title: "Hel" } },
//                     { op: "append", path: "/items/0/title", value: "lo" }]);
//   // doc is {items: [{title: "Hello"}]}
//
// `add` and `replace` are RFC 6902's, `append` concatenates its value to the
// string at `path`; paths are RFC 6901 JSON Pointers.

/**
 * @typedef {{op: "add" | "replace" | "append", path: string, value: any}} PatchOp
 */

/**
 * `doc` changed by `ops`, in order. Containers are changed in place, but the
 * root can be replaced (path ""), so always use the returned document.
 * @param {any} doc
 * @param {PatchOp[]} ops
 * @returns {any}
 */
export function apply(doc, ops) {
  for (const { op, path, value } of ops) {
    if (path === "") {
      doc = op === "append" ? doc + value : value;
      continue;
    }
    // "~1" before "~0" (RFC 6901 §4): "~01" is the key "~1", not "/".
    const tokens = path.slice(1).split("/").map((t) => t.replaceAll("~1", "/").replaceAll("~0", "~"));
    const last = /** @type {string} */ (tokens.pop());
    let target = doc;
    for (const t of tokens) target = Array.isArray(target) ? target[Number(t)] : target[t];
    if (Array.isArray(target) && op === "add") {
      target.splice(last === "-" ? target.length : Number(last), 0, value);
    } else if (Array.isArray(target)) {
      target[Number(last)] = op === "append" ? target[Number(last)] + value : value;
    } else {
      // defineProperty, not `=`: a key "__proto__" (a model may write one) is
      // then an own property, as JSON.parse makes it, not the object's prototype.
      Object.defineProperty(target, last, { value: op === "append" ? target[last] + value : value,
        writable: true, enumerable: true, configurable: true });
    }
  }
  return doc;
}
