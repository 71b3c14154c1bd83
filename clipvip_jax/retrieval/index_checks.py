"""An index folder is untrusted input: the checks every reader of one applies (index.py, string_table.py,
thumbnails.py, approximate.py, and `python -m clipvip_jax.index verify`).

Indexes get copied, shared and downloaded, so nothing in one is taken on trust:
  - every file opened is a regular file that resolves inside the index folder (`inside`): no symlink out of it,
    and no `..`, separator or hidden name in a name taken from index.json (`check_part_name`);
  - every field of index.json is type-checked (`meta_problems`), each wrong one named in one sentence with the file;
  - every offset and length is checked against the size of the file it points into (string tables, thumbnails);
  - non-finite rows are never ranked (exact.py and approximate.py mask them; verify lists them).
A damaged file raises IndexDamaged (a UsageError: the commands print its sentence and exit 2).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from typing import Any, Callable

from clipvip_jax.runtime.cli_errors import UsageError

# Part folder names as encode writes them ("part-00000"), and any other plain name: letters, digits, "_", "-" and
# single dots inside; never "..", a separator, a leading dot (hidden, or a temporary of encode) or over 100 chars.
_PART_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]|\.(?!\.)){0,99}")
VERIFY_HINT = "python -m clipvip_jax.index verify"


class IndexDamaged(UsageError):
  """A file of an index that is missing, damaged or hostile; the message names the file (and row or field)."""


def inside(root: str | os.PathLike, *names: str, kind: str = "file") -> pathlib.Path:
  """root/names..., checked: it resolves (symlinks followed) inside the real root, and is a regular file (kind
  "file") or a folder (kind "dir") there. IndexDamaged otherwise; FileNotFoundError-free: a missing path is
  IndexDamaged too, naming it."""
  root = pathlib.Path(root)
  path = root.joinpath(*names)
  real_root = root.resolve()
  real = path.resolve()
  if real != real_root and not real.is_relative_to(real_root):
    raise IndexDamaged(f"{path} leads outside the index folder {root} (to {real}); an index must hold its own "
                       "files, so it is refused")
  if kind == "file" and not real.is_file():
    raise IndexDamaged(f"{path} is missing" if not os.path.lexists(path) else f"{path} is not a regular file")
  if kind == "dir" and not real.is_dir():
    raise IndexDamaged(f"{path} is missing" if not os.path.lexists(path) else f"{path} is not a folder")
  return path


def exists_inside(root: str | os.PathLike, *names: str) -> bool:
  """Whether root/names... exists (a link counts, even a broken one: `inside` then says what is wrong)."""
  return os.path.lexists(pathlib.Path(root).joinpath(*names))


def check_part_name(name: Any, where: str) -> str:
  if not isinstance(name, str) or not _PART_NAME.fullmatch(name):
    raise IndexDamaged(f"{where} is {_show(name)}, not a part folder name (letters, digits, '_', '-' and single "
                       "dots; no '..', separator or leading dot)")
  return name


def read_json(path: pathlib.Path) -> Any:
  """The JSON value in `path` (a file already checked with `inside`); IndexDamaged naming it if it is not JSON."""
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise IndexDamaged(f"{path} is not valid JSON ({e})") from None
  except RecursionError:
    raise IndexDamaged(f"{path} is not valid JSON (nested too deeply)") from None


def _show(value: Any) -> str:
  try:
    text = json.dumps(value, ensure_ascii=False)
  except (TypeError, ValueError):
    text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _int_at_least(low: int) -> tuple[str, Callable[[Any], bool]]:
  return f"an integer >= {low}", lambda v: is_int(v) and v >= low


_STR = ("a string", lambda v: isinstance(v, str))
_NONEMPTY_STR = ("a non-empty string", lambda v: isinstance(v, str) and v != "")
_STR_OR_NULL = ("a string or null", lambda v: v is None or isinstance(v, str))
_INT_OR_NULL = ("an integer or null", lambda v: v is None or is_int(v))
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_OBJECT_OR_NULL = ("an object or null", lambda v: v is None or isinstance(v, dict))
_NUMBER_OR_NULL = ("a number or null", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)))


def _positive_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


_WINDOWS = ('{"window": seconds > 0, "stride": seconds > 0 and <= window}, or null',
            lambda v: v is None or (isinstance(v, dict) and _positive_number(v.get("window"))
                                    and _positive_number(v.get("stride")) and v["stride"] <= v["window"]))


def _one_of(values: tuple[str, ...]) -> tuple[str, Callable[[Any], bool]]:
  return f"one of {list(values)}", lambda v: v in values


def _list_of(what: str, test: Callable[[Any], bool]) -> tuple[str, Callable[[Any], bool]]:
  return f"a list of {what}", lambda v: isinstance(v, list) and all(test(x) for x in v)


def _skipped_entry(v: Any) -> bool:
  return isinstance(v, dict) and isinstance(v.get("id"), str) and isinstance(v.get("reason"), str)


def _string_list(v: Any) -> bool:
  return isinstance(v, list) and all(isinstance(x, str) for x in v)


def meta_problems(meta: Any, path: pathlib.Path, *, modalities: tuple[str, ...], dtypes: tuple[str, ...],
                  versions: tuple[int, ...]) -> list[str]:
  """Every field of index.json that is missing or of the wrong type, one sentence each naming `path` and the
  field (empty: the fields are as encode writes them). Fields this version does not know are left alone."""
  if not isinstance(meta, dict):
    return [f"{path} holds {_show(meta)}, not a JSON object"]
  version = meta.get("format_version")
  if not is_int(version) or version not in versions:
    return [f"{path} has format version {_show(version)}, which this version of clipvip_jax does not read (it "
            f"reads {' and '.join(map(str, sorted(versions, reverse=True)))}); rebuild it with python -m "
            "clipvip_jax.encode"]
  legacy = version == min(versions)
  fields: dict[str, tuple[bool, tuple[str, Callable[[Any], bool]]]] = {
      "kind": (True, _NONEMPTY_STR), "checkpoint": (True, _STR), "modality": (True, _one_of(modalities)),
      "count": (True, _int_at_least(0)), "dims": (True, _int_at_least(1)),
      "created_by": (False, _STR), "step": (False, _INT_OR_NULL), "config": (False, _STR_OR_NULL),
      "trust_pickle": (False, _BOOL), "source": (False, _STR_OR_NULL), "options": (False, _OBJECT_OR_NULL),
      "inputs": (False, _int_at_least(0)), "part_size": (False, _int_at_least(1)),
  }
  if legacy:
    fields.update({"ids": (True, _list_of("strings", lambda v: isinstance(v, str))),
                   "captions": (False, ("a list of lists of strings, or null",
                                        lambda v: v is None or (isinstance(v, list) and all(map(_string_list, v))))),
                   "skipped": (False, ("a list of {\"id\", \"reason\"} objects, or null",
                                       lambda v: v is None or (isinstance(v, list) and all(map(_skipped_entry, v)))))})
  else:
    fields.update({"parts": (True, ("a list of {\"name\", \"rows\"} objects", lambda v: isinstance(v, list))),
                   "dtype": (False, _one_of(dtypes)), "skipped": (False, _int_at_least(0)),
                   "captions": (False, _BOOL), "windows": (False, _WINDOWS),
                   "generation": (False, _int_at_least(0)),
                   "deleted": (False, _list_of("strings (ids deleted with index delete --id)",
                                               lambda v: isinstance(v, str)))})
  problems = []
  for name, (required, (expected, test)) in fields.items():
    if name not in meta:
      if required:
        problems.append(f"{path} lacks the field {name!r} ({expected})")
    elif not test(meta[name]):
      problems.append(f"{path}: field {name!r} must be {expected}, not {_show(meta[name])}")
  options = meta.get("options")
  if isinstance(options, dict):
    for name, (expected, test) in {"max_text_len": ("an integer >= 1 or null", lambda v: v is None or (is_int(v)
                                                                                                       and v >= 1)),
                                   "split": _STR_OR_NULL, "fps": _NUMBER_OR_NULL,
                                   "batch_size": _INT_OR_NULL}.items():
      if name in options and not test(options[name]):
        problems.append(f"{path}: field 'options.{name}' must be {expected}, not {_show(options[name])}")
  if legacy:
    if isinstance(meta.get("ids"), list) and is_int(meta.get("count")) and len(meta["ids"]) != meta["count"]:
      problems.append(f"{path} lists {len(meta['ids'])} ids for {meta['count']} rows")
    captions = meta.get("captions")
    if isinstance(captions, list) and is_int(meta.get("count")) and len(captions) != meta["count"]:
      problems.append(f"{path}: {len(captions)} caption lists for {meta['count']} rows")
    return problems
  parts = meta.get("parts")
  if isinstance(parts, list):
    seen: set[str] = set()
    for i, entry in enumerate(parts):
      where = f"{path}: field 'parts[{i}]"
      if not isinstance(entry, dict):
        problems.append(f"{where}' must be an object with \"name\" and \"rows\", not {_show(entry)}")
        continue
      if "name" not in entry:
        problems.append(f"{where}' lacks the field 'name'")
      else:
        try:
          name = check_part_name(entry["name"], f"{where}.name'")
        except IndexDamaged as e:
          problems.append(str(e))
        else:
          if name in seen:
            problems.append(f"{where}.name' repeats the part {name!r}")
          seen.add(name)
      if "rows" not in entry:
        problems.append(f"{where}' lacks the field 'rows'")
      elif not (is_int(entry["rows"]) and entry["rows"] >= 0):
        problems.append(f"{where}.rows' must be an integer >= 0, not {_show(entry['rows'])}")
    if not problems and is_int(meta.get("count")) and sum(p["rows"] for p in parts) != meta["count"]:
      problems.append(f"{path} says {meta['count']} rows but its parts list {sum(p['rows'] for p in parts)}")
  return problems


def part_info_problems(info: Any, path: pathlib.Path) -> list[str]:
  """part.json: {"first_input", "inputs", "rows", "skipped": [{"id", "reason"}]}."""
  if not isinstance(info, dict):
    return [f"{path} holds {_show(info)}, not a JSON object"]
  problems = []
  for name in ("first_input", "inputs", "rows"):
    if name in info and not (is_int(info[name]) and info[name] >= 0):
      problems.append(f"{path}: field {name!r} must be an integer >= 0, not {_show(info[name])}")
  skipped = info.get("skipped", [])
  if not (isinstance(skipped, list) and all(map(_skipped_entry, skipped))):
    problems.append(f"{path}: field 'skipped' must be a list of {{\"id\", \"reason\"}} objects, not {_show(skipped)}")
  return problems
