"""The controller document's shape, checked where each event-log entry touches it.

An entry that parses and whose patch applies can still break the document: `"patch":
"x"`, a replace of `/rollouts` by a list, a host record that is a string. Every reader
(`fleetctl rollouts`, the driver, the web API) would then fail far from the cause. So an
entry is checked whole before it is applied (`check_entry`), and the records its patch
touched are checked after it (`check_touched`): the log refuses the entry on append, a
replay names it as corrupt, and `state repair` skips it and keeps the entries after it.

Only the records a patch touches are checked (a host's record, a rollout's own fields,
one rollout host), so a rollout's thousands of appends stay cheap; a patch that replaces
a whole collection or the document checks all of it. Fields are checked by type where
they are known; fields this version does not know are left alone. Pure: raises
ValueError.
"""

from __future__ import annotations

from typing import Any

DOC_TYPE = "flotilla-controller-state"
OPS = frozenset({"add", "remove", "replace", "move", "copy", "test"})
_NUM = (int, float)
_NONE = type(None)

# field -> accepted types (None as NoneType); a missing field is accepted.
HOST = {"generation": (int,), "deployment_id": (str, _NONE), "rollout_id": (str, _NONE),
        "result": (str, _NONE), "system": (str, _NONE)}
ROLLOUT = {"id": (str,), "selector": (str, _NONE), "system": (str, _NONE),
           "action": (str, _NONE), "kind": (str,), "status": (str,), "created": _NUM,
           "finished": (*_NUM, _NONE), "policy": (dict,), "batches": (int,),
           "continued": (list,), "batch_done": (dict,), "awaiting_batch": (int, _NONE),
           "abort_requested": (dict, _NONE), "abort_reason": (str, _NONE),
           "hosts": (dict,)}
ROLLOUT_HOST = {"generation": (int, _NONE), "deployment_id": (str, _NONE), "status": (str,),
                "result": (str, _NONE), "message": (str,), "attempts": (int,),
                "started": (*_NUM, _NONE), "finished": (*_NUM, _NONE), "batch": (int,)}
REQUIRED_ROLLOUT = ("id", "status", "hosts")
REQUIRED_ROLLOUT_HOST = ("status",)


def check_entry(entry: Any) -> None:
    """An entry `{index, patch: [op, ...]}` as a whole, before any of it is applied."""
    if not isinstance(entry, dict):
        raise ValueError(f"an entry must be an object, not {_kind(entry)}")
    index = entry.get("index")
    if not isinstance(index, int) or isinstance(index, bool) or index < 0:
        raise ValueError(f"index must be a whole number, not {index!r}"[:120])
    patch = entry.get("patch")
    if not isinstance(patch, list):
        raise ValueError(f"patch must be a list of operations, not {_kind(patch)}")
    for n, op in enumerate(patch):
        if not isinstance(op, dict):
            raise ValueError(f"operation {n} must be an object, not {_kind(op)}")
        if op.get("op") not in OPS:
            raise ValueError(f"operation {n} has unknown op {op.get('op')!r}"[:120])
        if not isinstance(op.get("path"), str):
            raise ValueError(f"operation {n} has no path")
        if op["op"] in ("add", "replace", "test") and "value" not in op:
            raise ValueError(f"operation {n} ({op['op']}) has no value")
        if op["op"] in ("move", "copy") and not isinstance(op.get("from"), str):
            raise ValueError(f"operation {n} ({op['op']}) has no from")


def check_touched(doc: Any, patch: list[dict[str, Any]]) -> None:
    """The records `patch` (already applied to `doc`) touched still have their shape."""
    _check_top(doc)
    done: set[tuple[str, ...]] = set()
    for op in patch:
        for path in (op["path"], op.get("from")):
            if isinstance(path, str):
                target = _record_of(path)
                if target not in done:
                    done.add(target)
                    _check_record(doc, target)


def check_document(doc: Any) -> None:
    """The whole document (a snapshot, or what a repair rebuilt)."""
    _check_record(doc, ())


def _record_of(path: str) -> tuple[str, ...]:
    """The record a JSON pointer falls in: () the document, ("hosts",), ("hosts", H),
    ("rollouts",), ("rollouts", R), ("rollouts", R, "hosts"), ("rollouts", R, "hosts", H),
    or ("rollouts", R, "") for one of the rollout's own fields."""
    if path == "":
        return ()
    segs = [s.replace("~1", "/").replace("~0", "~") for s in path[1:].split("/")]
    if segs[0] not in ("hosts", "rollouts"):
        return ("top",)
    if len(segs) == 1:
        return (segs[0],)
    if segs[0] == "hosts" or len(segs) == 2:
        return (segs[0], segs[1])
    if segs[2] != "hosts":
        return ("rollouts", segs[1], "")
    return ("rollouts", segs[1], "hosts", *segs[3:4])


def _check_record(doc: Any, target: tuple[str, ...]) -> None:
    if target in ((), ("top",)):
        _check_top(doc)
        if target == ():
            for host, record in doc["hosts"].items():
                _fields(record, HOST, f"host {host!r}")
            for rid, r in doc["rollouts"].items():
                _check_rollout(rid, r, deep=True)
        return
    if target == ("hosts",):
        for host, record in doc["hosts"].items():
            _fields(record, HOST, f"host {host!r}")
    elif target == ("rollouts",):
        for rid, r in doc["rollouts"].items():
            _check_rollout(rid, r, deep=True)
    elif target[0] == "hosts":
        if target[1] in doc["hosts"]:
            _fields(doc["hosts"][target[1]], HOST, f"host {target[1]!r}")
    elif target[1] in doc["rollouts"]:
        rid, r = target[1], doc["rollouts"][target[1]]
        if len(target) < 4:
            _check_rollout(rid, r, deep=len(target) == 2 or target[2:] == ("hosts",))
        elif not isinstance(r, dict) or not isinstance(r.get("hosts"), dict):
            raise ValueError(f"rollout {rid!r} must be an object with hosts"[:160])
        elif target[3] in r["hosts"]:  # one host's record: the rollout's fields are as
            _fields(r["hosts"][target[3]], ROLLOUT_HOST,  # they were
                    f"rollout {rid!r} host {target[3]!r}", REQUIRED_ROLLOUT_HOST)


def _check_top(doc: Any) -> None:
    if not isinstance(doc, dict) or doc.get("_type") != DOC_TYPE:
        raise ValueError(f"the document must be an object with _type {DOC_TYPE!r}")
    for key in ("hosts", "rollouts"):
        if not isinstance(doc.get(key), dict):
            raise ValueError(f"{key} must be an object, not {_kind(doc.get(key))}")


def _check_rollout(rid: str, r: Any, deep: bool) -> None:
    where = f"rollout {rid!r}"
    _fields(r, ROLLOUT, where, REQUIRED_ROLLOUT)
    if r["id"] != rid:
        raise ValueError(f"{where} has id {r['id']!r}"[:120])
    if deep:
        for host, record in r["hosts"].items():
            _fields(record, ROLLOUT_HOST, f"{where} host {host!r}", REQUIRED_ROLLOUT_HOST)


def _fields(record: Any, spec: dict[str, tuple[type, ...]], where: str,
            required: tuple[str, ...] = ()) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where} must be an object, not {_kind(record)}"[:160])
    for key in required:
        if key not in record:
            raise ValueError(f"{where} has no {key}"[:160])
    for key, value in record.items():
        types = spec.get(key)
        if types is not None and (not isinstance(value, types)
                                  or (isinstance(value, bool) and bool not in types)):
            raise ValueError(f"{where}: {key} must not be {_kind(value)}"[:160])


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")
