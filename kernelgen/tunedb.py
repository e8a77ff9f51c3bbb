"""The tuning database, tune/db/<arch>.json: measured times per (key, config).

A key is (op, kernel, dtype, bucket) plus what a measurement depends on: the sha256 of the
generated kernel source (rendered from template + spec), the Triton version and the GPU; the arch
is the file. Times are stored per config, so adding a config to a space keeps every other result.
The file is sorted JSON (diff-able), written atomically, and validated on load: `kernelgen build`
turns an unreadable or stale DB into a warning and the static configs, never an error or a wrong
kernel.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from . import plaintext
from .space import config_id

FORMAT = 1


class DBError(ValueError):
    """The DB file is unreadable or malformed; the message says where."""


class TuneDBWarning(UserWarning):
    pass


@dataclass(frozen=True, order=True)
class EntryKey:
    op: str
    kernel: str
    dtype: str
    bucket: str
    source_sha256: str
    triton: str
    gpu: str

    @property
    def group(self) -> tuple[str, str, str, str]:
        return (self.op, self.kernel, self.dtype, self.bucket)


@dataclass
class Result:
    ms: float  # math.inf: did not run (out of resources, compile timeout, error)
    error: str = ""


@dataclass
class Entry:
    key: EntryKey
    problem: list[int]  # the shape measured: [n] for activations, [rows, cols] for norms
    bytes_moved: int  # DRAM bytes one launch must move, for the bandwidth figures
    static: str  # config_id of the static choice when it was measured: the baseline of speed-ups
    results: dict[str, Result] = field(default_factory=dict)  # config_id -> result

    def best(self, allowed: set[str] | None = None) -> tuple[str, Result] | None:
        ok = [(cid, r) for cid, r in self.results.items() if math.isfinite(r.ms) and (allowed is None or cid in allowed)]
        return min(ok, key=lambda t: (t[1].ms, t[0])) if ok else None


@dataclass
class TuneDB:
    arch: str
    entries: dict[EntryKey, Entry] = field(default_factory=dict)

    def entry(self, key: EntryKey, problem: list[int], bytes_moved: int, static: dict) -> Entry:
        if key not in self.entries:
            self.entries[key] = Entry(key, list(problem), int(bytes_moved), config_id(static))
        return self.entries[key]

    def record(self, key: EntryKey, config: dict, ms: float, error: str = "") -> None:
        error = plaintext.clean(error)[:MAX_ERROR]  # as parse() will accept it back
        self.entries[key].results[config_id(config)] = Result(float(ms), error)

    def to_json(self) -> str:
        """Sorted JSON with one entry header and one result per line: small diffs, stable bytes."""
        blocks = []
        for key in sorted(self.entries):
            e = self.entries[key]
            head = {**{f: getattr(key, f) for f in EntryKey.__dataclass_fields__}, "problem": e.problem,
                    "bytes_moved": e.bytes_moved, "static": json.loads(e.static)}
            results = [
                {"config": json.loads(cid), "ms": float(f"{r.ms:.6g}") if math.isfinite(r.ms) else None,
                 **({"error": r.error} if r.error else {})}
                for cid, r in sorted(e.results.items())
            ]
            lines = ",\n".join("      " + json.dumps(r, sort_keys=True) for r in results)
            blocks.append("    " + json.dumps(head, sort_keys=True)[:-1] + ', "results": [\n' + lines + "\n    ]}")
        body = ",\n".join(blocks)
        return (f'{{\n  "arch": {json.dumps(self.arch)},\n  "entries": [\n{body}\n  ],\n  "format": {FORMAT}\n}}\n'
                if blocks else f'{{\n  "arch": {json.dumps(self.arch)},\n  "entries": [],\n  "format": {FORMAT}\n}}\n')

    def save(self, path: Path) -> None:
        """Write atomically: a temp file in the same folder, then rename over the old one."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def db_path(db_dir: Path, arch: str) -> Path:
    return Path(db_dir) / f"{arch}.json"


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise DBError(f"{where}: {what}")


# The shape of every key field. The DB comes from another machine, maybe another person: its text
# reaches configs.py (quoted, templating.py) and the manifest, so each field is held to what kernelgen
# itself writes there; the free-text one (the GPU's name) to one line of printable text.
_KEY_FORMATS = {
    "op": (re.compile(r"[a-z][a-z0-9_]{0,47}"), "an op name"),
    "kernel": (re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*"), "a kernel name such as layernorm.affine.forward"),
    "dtype": (re.compile(r"[a-z0-9]{1,16}"), "a dtype name such as bfloat16"),
    "bucket": (re.compile(r"[a-z]+(<=|>)[0-9]+(,[a-z]+(<=|>)[0-9]+)*"), "a bucket label such as n<=65536"),
    "source_sha256": (re.compile(r"[0-9a-f]{64}"), "64 lower-case hex digits"),
    "triton": (re.compile(r"[0-9A-Za-z.+_-]{1,64}"), "a version such as 3.2.0"),
}
_CONFIG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_TEXT = 200  # the GPU's name
MAX_ERROR = 2000  # a measurement's error message


def _text(value, where: str, field: str | None = None, max_len: int = MAX_TEXT) -> str:
    _need(isinstance(value, str) and value != "", where, f"must be a non-empty string, got {value!r:.80}")
    if field in _KEY_FORMATS:
        pattern, what = _KEY_FORMATS[field]
        _need(pattern.fullmatch(value) is not None, where, f"must be {what}, got {value!r:.80}")
    else:
        _need(len(value) <= max_len, where, f"must be at most {max_len} characters, got {len(value)}")
        bad = plaintext.problem(value)
        _need(bad is None, where, f"{value!r:.80} {bad}")
    return value


def _config(cfg, where: str) -> dict:
    _need(isinstance(cfg, dict) and cfg and all(isinstance(k, str) and _CONFIG_NAME.fullmatch(k) and isinstance(v, int)
                                                for k, v in cfg.items()),  # bools too: SINGLE_PASS
          where, f"must map parameter names to integers, got {cfg!r:.120}")
    return cfg


def parse(text: str, arch: str, where: str) -> TuneDB:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DBError(f"{where}: not JSON ({err})") from None
    _need(isinstance(data, dict), where, "must be a JSON object")
    _need(data.get("format") == FORMAT, where, f"format {data.get('format')!r}; this kernelgen reads format {FORMAT}")
    _need(data.get("arch") == arch, where, f"holds arch {data.get('arch')!r}, expected {arch!r}")
    _need(isinstance(data.get("entries"), list), where, "entries must be a list")
    db = TuneDB(arch)
    for i, e in enumerate(data["entries"]):
        at = f"{where}: entries[{i}]"
        _need(isinstance(e, dict), at, "must be an object")
        key = EntryKey(**{f: _text(e.get(f), f"{at}.{f}", f) for f in EntryKey.__dataclass_fields__})
        _need(key not in db.entries, at, "repeats an earlier entry's key")
        problem, moved = e.get("problem"), e.get("bytes_moved")
        _need(isinstance(problem, list) and problem and all(isinstance(n, int) and n > 0 for n in problem),
              f"{at}.problem", f"must be a list of positive integers, got {problem!r}")
        _need(isinstance(moved, int) and moved > 0, f"{at}.bytes_moved", f"must be a positive integer, got {moved!r}")
        entry = db.entry(key, problem, moved, _config(e.get("static"), f"{at}.static"))
        _need(isinstance(e.get("results"), list), f"{at}.results", "must be a list")
        for j, r in enumerate(e["results"]):
            rat = f"{at}.results[{j}]"
            _need(isinstance(r, dict), rat, "must be an object")
            cfg = _config(r.get("config"), f"{rat}.config")
            ms = r.get("ms")
            _need(ms is None or (isinstance(ms, (int, float)) and not isinstance(ms, bool) and 0 < ms < math.inf),
                  f"{rat}.ms", f"must be a positive number or null, got {ms!r}")
            error = r.get("error", "")
            _need(isinstance(error, str), f"{rat}.error", "must be a string")
            if error:
                _text(error, f"{rat}.error", max_len=MAX_ERROR)
            _need(config_id(cfg) not in entry.results, rat, "repeats a config of this entry")
            entry.results[config_id(cfg)] = Result(math.inf if ms is None else float(ms), error)
    return db


def load(path: Path, arch: str) -> TuneDB:
    """The DB at `path` (empty if the file does not exist); DBError if it is unreadable."""
    path = Path(path)
    if not path.exists():
        return TuneDB(arch)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise DBError(f"{path}: cannot read ({err})") from None
    return parse(text, arch, str(path))


def load_or_warn(path: Path, arch: str) -> TuneDB:
    """For the build: a bad DB is a warning and an empty DB (static configs), never a failed build."""
    try:
        return load(path, arch)
    except DBError as err:
        warnings.warn(f"ignoring the tuning database: {err}; every {arch} kernel gets its static config",
                      TuneDBWarning, stacklevel=2)
        return TuneDB(arch)


@dataclass(frozen=True)
class Tuned:
    config: dict
    ms: float
    static_ms: float | None  # the static config's time in the same measurement set, if measured
    key: EntryKey


def tuned_choice(db: TuneDB, group: tuple[str, str, str, str], source_sha256: str, allowed: list[dict],
                 static: dict, triton_version: str) -> Tuned | None:
    """The fastest measured config of `group` among `allowed` (those the build kept), from entries
    of this very kernel source. Several GPUs or Triton versions: the current Triton's entries
    first, then the entry with the most results, then by name, so the choice is deterministic."""
    entries = [e for k, e in db.entries.items() if k.group == group and k.source_sha256 == source_sha256]
    allowed_ids = {config_id(c) for c in allowed}
    entries = [e for e in entries if e.best(allowed_ids)]
    if not entries:
        return None
    entry = min(entries, key=lambda e: (e.key.triton != triton_version, -len(e.results), e.key.gpu, e.key.triton))
    cid, result = entry.best(allowed_ids)
    static_result = entry.results.get(config_id(static))
    static_ms = static_result.ms if static_result and math.isfinite(static_result.ms) else None
    return Tuned(json.loads(cid), result.ms, static_ms, entry.key)


def stale_groups(db: TuneDB, sources: dict[tuple[str, str, str, str], str]) -> list[tuple[str, str, str, str]]:
    """Groups this build makes whose DB entries were all measured on another kernel source."""
    measured: dict[tuple, set[str]] = {}
    for k in db.entries:
        if k.group in sources:
            measured.setdefault(k.group, set()).add(k.source_sha256)
    return sorted(g for g, shas in measured.items() if sources[g] not in shas)
