"""Builders of malicious bundles: what an attacker who writes the whole folder can put in it.

Every builder copies a good bundle and rewrites its manifest so the sha256 and file table match
(the attacker writes the manifest too). Payloads create ``canary``; a test that sees the canary
has watched a bundle run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _json_node(value: Any) -> dict:
    return {"__class__": type(value).__name__, "__module__": "builtins", "__loader__": "JsonNode",
            "content": json.dumps(value), "is_json": True, "__id__": 1}


def _call_node(module: str, name: str, args: list[dict]) -> dict:
    """A skops node that, when loaded, calls ``module.name(*args)`` (skops' ConstructorFromReduceNode)."""
    return {"__class__": name, "__module__": module, "__loader__": "ConstructorFromReduceNode", "__id__": 5,
            "content": {"__class__": "tuple", "__module__": "builtins", "__loader__": "TupleNode", "content": args,
                        "__id__": 2}}


def _empty_dict_node() -> dict:
    return {"__class__": "dict", "__module__": "builtins", "__loader__": "DictNode", "content": {}, "__id__": 3,
            "key_types": {"__class__": "list", "__module__": "builtins", "__loader__": "ListNode", "content": [],
                          "__id__": 6}}


def write_code(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').write('code ran')"


def skops_with_call(data: bytes, module: str, name: str, canary: Path, step: str = "StandardScaler",
                    attr: str = "copy") -> bytes:
    """A real skops file of a Pipeline whose ``step``'s ``attr`` attribute is a call node."""
    code = write_code(canary)
    if name == "runstring":
        args = [_json_node(code), _empty_dict_node()]
    elif name == "system":
        args = [_json_node(f"touch {canary}")]
    else:
        args = [_json_node(code)]
    z = zipfile.ZipFile(io.BytesIO(data))
    schema = json.loads(z.read("schema.json"))
    steps = schema["content"]["content"]["steps"]["content"]
    node = next(s["content"][1] for s in steps if s["content"][1]["__class__"] == step)
    node["content"]["content"][attr] = _call_node(module, name, args)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zo:
        for n in z.namelist():
            zo.writestr(n, json.dumps(schema) if n == "schema.json" else z.read(n))
    return out.getvalue()


class _Payload:
    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return (exec, (f"open({self.canary!r}, 'w').write('code ran')",))


def pickle_payload(canary: Path) -> bytes:
    return pickle.dumps(_Payload(canary))


def copy_bundle(good: Path, dst: Path) -> Path:
    shutil.copytree(good, dst, symlinks=True)
    return dst


def rewrite(bundle: Path, edit: Callable[[dict], Any]) -> Path:
    """Apply ``edit`` to the manifest, then refresh every sha256 the way an attacker would."""
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m)
    section = m.get("finetune") if m.get("kind") == "finetuned" else m.get("head")
    if isinstance(section, dict) and isinstance(section.get("file"), str):
        f = Path(section["file"]) if os.path.isabs(section["file"]) else bundle / section["file"]
        if f.is_file():
            section["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    m["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in bundle.iterdir() if p.is_file() and p.name != "manifest.json"}
    mf.write_text(json.dumps(m, indent=2))
    return bundle
