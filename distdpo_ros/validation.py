"""Checks of untrusted input shared by several readers: seeds, JSON text, numpy dtype codes.

Each raises :class:`~distdpo_ros.errors.UserError` with one line naming what was read (a file, a
field, an option), so every command refuses bad input the same way.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from distdpo_ros.errors import UserError

# Seeds go to torch.Generator.manual_seed (64 bits) and numpy (any size): the common range.
SEED_MAX = 2**63 - 1
# Deeper JSON than this is not a config or a training-state header but an attack on the parser
# (Python's json recursion ends in RecursionError at ~1,000 levels, a traceback).
JSON_MAX_DEPTH = 64
# The numpy dtype codes of plain numbers: no objects, no structured or void types, no strings.
PLAIN_DTYPE_CODES = frozenset({'b1', 'i1', 'i2', 'i4', 'i8', 'u1', 'u2', 'u4', 'u8',
                               'f2', 'f4', 'f8', 'c8', 'c16'})

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)


def check_seed(value: Any, option: str = '--seed', allow_random: bool = False) -> int:
    """`value` as a seed in [0, 2**63 - 1] (and -1 for "draw one" when `allow_random`)."""
    low = -1 if allow_random else 0
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= SEED_MAX:
        extra = ' (or -1 for a random one)' if allow_random else ''
        raise UserError(f'{option} must be a whole number from 0 to 2**63 - 1{extra}, '
                        f'got {value!r}')
    return value


def json_depth(text: str | bytes) -> int:
    """The deepest nesting of arrays/objects in JSON text (strings are skipped), linear time."""
    data = text.encode('utf-8', 'surrogatepass') if isinstance(text, str) else bytes(text)
    data = _JSON_STRING.sub(b'""', data)
    codes = np.frombuffer(data, dtype=np.uint8)
    steps = (np.isin(codes, (ord('['), ord('{'))).astype(np.int64)
             - np.isin(codes, (ord(']'), ord('}'))))
    return int(np.cumsum(steps).max(initial=0))


def loads_json(text: str | bytes, source: str, max_depth: int = JSON_MAX_DEPTH) -> Any:
    """json.loads with the nesting bounded; UserError naming `source` for bad or deep JSON."""
    depth = json_depth(text)
    if depth > max_depth:
        raise UserError(f'{source}: JSON nested {depth} levels deep (at most {max_depth} are '
                        'allowed)')
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f' at line {exc.lineno}' if isinstance(exc, json.JSONDecodeError) else ''
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else 'not UTF-8 text'
        raise UserError(f'{source}: not valid JSON ({reason}{where})') from None


def plain_dtype(code: Any, source: str) -> np.dtype:
    """A numpy dtype of plain numbers from a code such as '<f4' or 'u1' read from a file."""
    if isinstance(code, str) and code[:1] in '<>|=' and code[1:] in PLAIN_DTYPE_CODES:
        order, code = code[0], code[1:]
    else:
        order = '='
    if not isinstance(code, str) or code not in PLAIN_DTYPE_CODES:
        raise UserError(f'{source}: dtype {code!r} is not a plain number type (one of '
                        f'{", ".join(sorted(PLAIN_DTYPE_CODES))})')
    dtype = np.dtype(code)
    return dtype.newbyteorder(order) if order in '<>' and dtype.itemsize > 1 else dtype
