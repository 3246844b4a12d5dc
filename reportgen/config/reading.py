"""Reading the manifest file: a regular file of bounded size, UTF-8 YAML, one document, no key
written twice; every problem located by line and column."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from reportgen.config.bounds import MAX_MANIFEST_BYTES
from reportgen.config.messages import short as _short
from reportgen.config.messages import show as _show
from reportgen.errors import ManifestError
from reportgen.files import NotRegularFile, open_regular

__all__ = ["read_yaml"]


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` under its own name, so no global resolver is touched."""


def read_yaml(path: Path) -> tuple[Any, list[str]]:
    """Parse the manifest file.

    Returns:
        The parsed document and the problems that do not stop validation (duplicate keys).

    Raises:
        ManifestError: the file cannot be read or is not valid YAML.
    """
    try:
        raw = _read_regular_file(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        raise ManifestError(path, ["manifest file not found"]) from None
    except IsADirectoryError:
        raise ManifestError(path, ["is a directory, not a manifest file"]) from None
    except PermissionError:
        raise ManifestError(path, ["cannot read the manifest file: permission denied"]) from None
    except NotRegularFile as exc:
        raise ManifestError(path, [f"is {exc.kind}, not a manifest file; only regular files are read"]) from None
    except _TooLarge:
        raise ManifestError(
            path, [f"is larger than {MAX_MANIFEST_BYTES // (1024 * 1024)} MiB, the limit for a manifest"]
        ) from None
    except (OSError, ValueError) as exc:
        raise ManifestError(path, [f"cannot read the manifest file: {getattr(exc, 'strerror', None) or exc}"]) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ManifestError(path, [f"not UTF-8 text: undecodable byte at line {line} (byte offset {exc.start})"]) from None

    loader = None
    try:
        loader = _Loader(text)  # the reader rejects control characters right here
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node)
        return (loader.construct_document(node) if node is not None else None), duplicates
    except yaml.MarkedYAMLError as exc:
        raise ManifestError(path, [_describe_yaml_error(exc)]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        raise ManifestError(
            path, [f"invalid YAML at line {line}, column {column}: unacceptable character #x{exc.character:04x}"]
        ) from None
    except RecursionError:
        raise ManifestError(path, ["invalid YAML: nested too deeply"]) from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # Python refuses ints of more than 4300 digits
            raise ManifestError(path, ["invalid YAML: a number has more than 4300 digits"]) from None
        raise ManifestError(path, [f"invalid YAML: {_short(str(exc))}"]) from None
    except Exception as exc:  # the YAML library's own checks are not all YAMLErrors
        raise ManifestError(path, [f"invalid YAML: {type(exc).__name__}: {_short(str(exc))}"]) from None
    finally:
        if loader is not None:
            loader.dispose()


class _TooLarge(OSError):
    """The file is larger than allowed."""


def _read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes.

    Opened without blocking (a FIFO would otherwise wait for a writer for ever) and checked on
    the open descriptor, so the file checked is the file read; at most ``limit + 1`` bytes are
    read, so a file that grows meanwhile cannot exhaust memory either.

    Raises:
        IsADirectoryError, NotRegularFile: a folder, FIFO, device or socket.
        _TooLarge: more than ``limit`` bytes.
        OSError: the file cannot be opened or read.
    """
    fd, info = open_regular(path)
    try:
        if info.st_size > limit:
            raise _TooLarge()
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise _TooLarge()
    return b"".join(chunks)


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = exc.problem or "invalid syntax"
    if exc.context and problem.startswith("but "):
        # The composer splits one sentence in two: "expected a single document" / "but found ...".
        return f"invalid YAML{where}: {exc.context}, {problem}"
    message = f"invalid YAML{where}: {problem}"
    if exc.context:
        context_mark = exc.context_mark
        context_where = (
            f" at line {context_mark.line + 1}, column {context_mark.column + 1}"
            if context_mark is not None and context_mark is not mark
            else ""
        )
        message += f" ({exc.context}{context_where})"
    return message


def _duplicate_keys(root: yaml.Node | None) -> list[str]:
    """Find keys written twice in one mapping: YAML keeps the last silently, hiding typos."""
    problems: list[str] = []
    stack = [root] if root is not None else []
    seen_nodes: set[int] = set()  # aliases make the node graph a DAG (or even cyclic)
    while stack:
        node = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[tuple[str, str]] = set()
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                    ident = (key_node.tag, key_node.value)
                    if ident in keys:
                        mark = key_node.start_mark
                        problems.append(
                            f"line {mark.line + 1}, column {mark.column + 1}: duplicate key "
                            f"{_show(key_node.value)} (only the last one would be used)"
                        )
                    keys.add(ident)
                stack.extend((key_node, value_node))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    problems.sort(key=_line_number)
    return problems


def _line_number(problem: str) -> int:
    return int(problem.split(",", 1)[0].removeprefix("line "))
