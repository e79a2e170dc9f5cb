"""The files of `jaxpaged-eval`: JSONL input rows validated up front, and the append-only
results file that makes `generate` resumable.

Every input line is checked before any model work starts, so a typo on line 900 fails in a
second rather than after an hour; an error names the file and line, what was given and what is
allowed.

Resuming: the results file is append-only, one JSON object per line, each line written with a
single `write()` and flushed. A process killed mid-write can leave at most a partial last line;
`recover_output` cuts it off and returns the keys of the complete rows, so a re-run skips
exactly those. A row's key is its id as JSON (so `1` and `"1"` stay different ids); a row
whose id is unusable (missing, of a wrong type, repeated) is keyed by its line number instead.

Host only: no `jax` import.
"""

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxpaged.sampling_params import SamplingParams

RowId = str | int
# Fields a row may override, by SamplingParams' names. Left out: `n`, since a result row holds
# one completion (n > 1 is n rows), and the logprobs fields, which results do not carry.
SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SamplingParams)
                        if f.name not in ("n", "logprobs", "prompt_logprobs"))
GENERATE_FIELDS = ("id", "prompt", "messages", "metadata")
LOGLIKELIHOOD_FIELDS = ("id", "context", "continuations", "answer", "metadata")
# Every result row starts with its id, so a torn last line is recognisably one of ours.
ROW_PREFIX = b'{"id": '


class InputError(ValueError):
    """Bad input from the user; the CLI prints it and exits with status 2."""


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type with its article ("an array"), for messages."""
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def show(value: object) -> str:
    """A value from an input file as the user wrote it (JSON), shortened for a message."""
    return _clip(json.dumps(value, ensure_ascii=False))


def row_key(row_id: RowId | None, line: int) -> str:
    return json.dumps(row_id) if row_id is not None else f"line:{line}"


@dataclasses.dataclass(frozen=True)
class GenerateRow:
    line: int
    id: RowId
    prompt: str | None  # exactly one of prompt / messages is set
    messages: list[dict[str, str]] | None
    overrides: dict[str, Any]  # SamplingParams fields set by this row
    metadata: Any = None  # copied to the result as given

    @property
    def key(self) -> str:
        return row_key(self.id, self.line)


@dataclasses.dataclass(frozen=True)
class InvalidRow:
    """A line that failed validation, kept (under --skip-invalid) to become an error row."""

    line: int
    id: RowId | None  # None when the id itself was the problem
    error: str

    @property
    def key(self) -> str:
        return row_key(self.id, self.line)


@dataclasses.dataclass(frozen=True)
class LoglikelihoodRow:
    line: int
    id: RowId
    context: str
    continuations: list[str]
    answer: int | None  # index into continuations
    metadata: Any = None


def _read_input(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"--input {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"--input {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    except OSError as e:
        raise InputError(f"--input {path}: cannot read it ({e.strerror})") from None


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each non-blank line; InputError for an unreadable,
    non-UTF-8 or empty file."""
    # Split on "\n" only: JSON strings may hold U+2028 and friends, which splitlines() breaks.
    lines = [(i, line) for i, line in enumerate(_read_input(path).split("\n"), 1)
             if line.strip()]
    if not lines:
        raise InputError(f"--input {path}: the file is empty; expected one JSON object per line")
    return iter(lines)


def _parse_object(where: str, text: str) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): "
                         f"{_clip(text)}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object like {{\"id\": ..., ...}}, got "
                         f"{json_type(obj)}: {_clip(text)}")
    return obj


def _clip(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _check_id(where: str, obj: dict[str, Any]) -> RowId:
    if "id" not in obj:
        raise InputError(f"{where}: missing \"id\" (a string or an integer)")
    value = obj["id"]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(f"{where}: \"id\" must be a string or an integer, got {show(value)} "
                         f"({json_type(value)})")
    if isinstance(value, str) and not value:
        raise InputError(f"{where}: \"id\" must not be an empty string")
    return value


def _check_fields(where: str, obj: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = [k for k in obj if k not in allowed]
    if unknown:
        raise InputError(f"{where}: unknown field {show(unknown[0])}; allowed: "
                         f"{', '.join(allowed)}")


def _check_messages(where: str, messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: \"messages\" must be a non-empty array of "
                         f"{{\"role\": ..., \"content\": ...}} objects, got {show(messages)}")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)):
            raise InputError(f"{where}: messages[{i}] must be an object with string \"role\" "
                             f"and \"content\", got {show(m)}")
    return messages


def parse_generate_row(where: str, line: int, text: str,
                       base_params: dict[str, Any]) -> GenerateRow:
    """One generate input line; `base_params` are the command line's sampling settings, which
    the row's overrides are validated against."""
    obj = _parse_object(where, text)
    _check_fields(where, obj, GENERATE_FIELDS + SAMPLING_FIELDS)
    row_id = _check_id(where, obj)
    if ("prompt" in obj) == ("messages" in obj):
        raise InputError(f"{where}: give exactly one of \"prompt\" (a string) or \"messages\" "
                         f"(a chat), got {'both' if 'prompt' in obj else 'neither'}")
    prompt = messages = None
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise InputError(f"{where}: \"prompt\" must be a non-empty string, got "
                             f"{show(prompt)}")
    else:
        messages = _check_messages(where, obj["messages"])
    overrides = {k: v for k, v in obj.items() if k in SAMPLING_FIELDS}
    try:
        SamplingParams(**{**base_params, **overrides})
    except (ValueError, TypeError) as e:
        raise InputError(f"{where}: {e}") from None
    return GenerateRow(line, row_id, prompt, messages, overrides, obj.get("metadata"))


def read_generate_rows(path: Path, base_params: dict[str, Any], skip_invalid: bool
                       ) -> tuple[list[GenerateRow], list[InvalidRow]]:
    """Every row of a generate input file. Raises InputError on the first bad line unless
    `skip_invalid`, which returns the bad lines as InvalidRows instead."""
    rows: list[GenerateRow] = []
    invalid: list[InvalidRow] = []
    first_line: dict[str, int] = {}
    for line, text in iter_lines(path):
        where = f"{path}:{line}"
        try:
            row = parse_generate_row(where, line, text, base_params)
            if row.key in first_line:
                raise InputError(f"{where}: id {show(row.id)} is repeated (first on line "
                                 f"{first_line[row.key]}); ids must be unique")
        except InputError as e:
            if not skip_invalid:
                raise
            bad = InvalidRow(line, _usable_id(text, first_line), str(e))
            if bad.id is not None:  # its error row holds the id now; a later use repeats it
                first_line[bad.key] = line
            invalid.append(bad)
            continue
        first_line[row.key] = line
        rows.append(row)
    return rows, invalid


def _usable_id(text: str, seen: dict[str, int]) -> RowId | None:
    """The id of a bad line if it can still key its error row without clashing."""
    try:
        value = json.loads(text).get("id")
    except (json.JSONDecodeError, AttributeError):
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return None if json.dumps(value) in seen else value


def parse_loglikelihood_row(where: str, line: int, text: str) -> LoglikelihoodRow:
    obj = _parse_object(where, text)
    _check_fields(where, obj, LOGLIKELIHOOD_FIELDS)
    row_id = _check_id(where, obj)
    context = obj.get("context")
    if not isinstance(context, str):
        raise InputError(f"{where}: \"context\" must be a string (it may be empty), got "
                         f"{show(context)}")
    conts = obj.get("continuations")
    if not (isinstance(conts, list) and conts
            and all(isinstance(c, str) and c for c in conts)):
        raise InputError(f"{where}: \"continuations\" must be a non-empty array of non-empty "
                         f"strings, got {show(conts)}")
    answer = obj.get("answer")
    if answer is not None:
        if isinstance(answer, str) and answer in conts:
            answer = conts.index(answer)
        elif isinstance(answer, bool) or not isinstance(answer, int) \
                or not 0 <= answer < len(conts):
            raise InputError(f"{where}: \"answer\" must be an index in [0, {len(conts)}) or one "
                             f"of the continuations, got {show(answer)}")
    return LoglikelihoodRow(line, row_id, context, conts, answer, obj.get("metadata"))


def read_loglikelihood_rows(path: Path) -> list[LoglikelihoodRow]:
    rows, first_line = [], {}
    for line, text in iter_lines(path):
        row = parse_loglikelihood_row(f"{path}:{line}", line, text)
        key = row_key(row.id, line)
        if key in first_line:
            raise InputError(f"{path}:{line}: id {show(row.id)} is repeated (first on line "
                             f"{first_line[key]}); ids must be unique")
        first_line[key] = line
        rows.append(row)
    return rows


def read_text(path: Path) -> str:
    text = _read_input(path)
    if not text.strip():
        raise InputError(f"--input {path}: the file is empty; expected some text to score")
    return text


def check_output_path(path: Path, flag: str = "--output") -> None:
    """Fail before any work if results could not be written to `path`."""
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file path")
    if not path.parent.is_dir():
        raise InputError(f"{flag} {path}: the directory {path.parent} does not exist")


def recover_output(path: Path) -> tuple[set[str], int]:
    """Keys of the complete rows already in a results file, and the number of bytes of a
    partial last line that was cut off (0 if none). A missing file has no rows.

    Only the last line can be partial (each row is one write, starting with ROW_PREFIX); any
    other bad line means the file is not ours or was edited, and is an InputError rather than
    something to repair."""
    if not path.exists():
        return set(), 0
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    tail = data[complete:]
    if tail and not tail.startswith(ROW_PREFIX):
        raise InputError(f"--output {path}: ends with an incomplete line that jaxpaged-eval did "
                         f"not write ({_clip(tail.decode('utf-8', 'replace'))}); give a new "
                         f"--output file")
    keys = set()
    for number, raw in enumerate(data[:complete].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        key = _result_key(raw)
        if key is None:
            raise InputError(f"--output {path}:{number}: not a result row of jaxpaged-eval "
                             f"generate ({_clip(raw.decode('utf-8', 'replace'))}); give a new "
                             f"--output file or remove the line")
        keys.add(key)
    if tail:
        with open(path, "r+b") as f:
            f.truncate(complete)
    return keys, len(tail)


def _result_key(raw: bytes) -> str | None:
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(obj, dict) or "id" not in obj:
        return None
    row_id = obj["id"]
    if row_id is None and isinstance(obj.get("line"), int):
        return row_key(None, obj["line"])
    if isinstance(row_id, bool) or not isinstance(row_id, (str, int)):
        return None
    return row_key(row_id, 0)


class ResultWriter:
    """Appends result rows, each as one `write()` of a whole line, so that a kill leaves at
    most a partial last line and never interleaves two rows."""

    def __init__(self, path: Path):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.num_written = 0

    def write(self, row: dict[str, Any]) -> None:
        row = {"id": row["id"], **row}  # id first: see ROW_PREFIX
        data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it whole; loop only for the odd short write
            view = view[os.write(self._fd, view):]
        self.num_written += 1

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> "ResultWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
