"""Point cloud files without open3d: KITTI .bin, .npy, PLY and PCD (ASCII and binary), numpy only.

`read_points(path)` returns the x, y, z columns as an (N, 3) float32 array (non-finite rows are
kept; the Completer drops them). `write_points(path, xyz)` writes by suffix, atomically (a
temporary file in the same folder, fsync, rename). Anything unreadable raises UserError naming the
file and the problem in one line.

Supported: KITTI/nuScenes .bin (little-endian float32 rows, `bin_columns` values per point, 4 for
KITTI, 5 for nuScenes sweeps); .npy (numeric (N, >=3) or a structured array with x, y, z);
PLY `ascii` / `binary_little_endian` / `binary_big_endian` with the vertex element anywhere after
fixed-size elements; PCD v0.7 `ascii` / `binary` (not `binary_compressed`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from distdpo_ros.atomic import atomic_writer
from distdpo_ros.errors import UserError

SUFFIXES = ('.bin', '.npy', '.ply', '.pcd')
MAX_HEADER_BYTES = 64 * 1024

_PLY_TYPES = {
    'char': 'i1', 'int8': 'i1', 'uchar': 'u1', 'uint8': 'u1', 'short': 'i2', 'int16': 'i2',
    'ushort': 'u2', 'uint16': 'u2', 'int': 'i4', 'int32': 'i4', 'uint': 'u4', 'uint32': 'u4',
    'float': 'f4', 'float32': 'f4', 'double': 'f8', 'float64': 'f8',
}
_PLY_FORMATS = {'ascii': None, 'binary_little_endian': '<', 'binary_big_endian': '>'}
_PCD_KINDS = {'F': 'f', 'I': 'i', 'U': 'u'}
_PCD_SIZES = {'F': (4, 8), 'I': (1, 2, 4, 8), 'U': (1, 2, 4, 8)}


def read_points(path: str | os.PathLike, bin_columns: int = 4) -> np.ndarray:
    """The x, y, z of every point in a .bin, .npy, .ply or .pcd file as (N, 3) float32."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f'{path}: unsupported point cloud format {suffix or "(no suffix)"!r}; '
                        f'use one of {", ".join(SUFFIXES)}')
    if suffix == '.npy':
        return _read_npy(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f'{path}: file not found') from None
    except OSError as exc:
        raise UserError(f'{path}: cannot read ({exc.strerror or exc})') from None
    if suffix == '.bin':
        return _read_bin(path, data, bin_columns)
    if suffix == '.ply':
        return _read_ply(path, data)
    return _read_pcd(path, data)


def _xyz(columns: list[np.ndarray]) -> np.ndarray:
    return np.stack(columns, axis=1).astype(np.float32, copy=False)


def _read_bin(path: Path, data: bytes, columns: int) -> np.ndarray:
    if columns < 3:
        raise UserError(f'{path}: a .bin point needs at least 3 values, got bin_columns={columns}')
    row = 4 * columns
    if len(data) % row:
        raise UserError(f'{path}: truncated .bin file ({len(data)} bytes is not a multiple of '
                        f'{row} = {columns} float32 per point)')
    return np.frombuffer(data, dtype='<f4').reshape(-1, columns)[:, :3].astype(np.float32)


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise UserError(f'{path}: file not found') from None
    except (OSError, ValueError) as exc:
        raise UserError(f'{path}: not a readable .npy file ({exc})') from None
    if array.dtype.names is not None:
        missing = [n for n in 'xyz' if n not in array.dtype.names]
        if missing:
            raise UserError(f'{path}: structured array without field(s) {missing}')
        for name in 'xyz':
            field = array.dtype.fields[name][0]
            if field.shape or field.kind not in 'fiu':
                raise UserError(f'{path}: field {name!r} is {field.base.str}'
                                f'{" " + str(field.shape) if field.shape else ""}; x, y and z '
                                'must each be one number per point')
        return _xyz([np.asarray(array[n], dtype=np.float64).reshape(-1) for n in 'xyz'])
    if array.ndim != 2 or array.shape[1] < 3 or array.dtype.kind not in 'fiu':
        raise UserError(f'{path}: expected a numeric (N, >=3) array, got {array.dtype} '
                        f'{array.shape}')
    return array[:, :3].astype(np.float32)


def _split_header(path: Path, data: bytes, end: bytes, what: str) -> tuple[list[str], int]:
    """Header lines (decoded, stripped, no comments) and the byte offset of the body."""
    stop = data.find(end, 0, MAX_HEADER_BYTES)
    if stop < 0:
        raise UserError(f'{path}: not a {what} file (no {end.decode().strip()!r} line in the '
                        'header)')
    newline = data.find(b'\n', stop + len(end))
    body = len(data) if newline < 0 else newline + 1
    try:
        text = data[:body].decode('ascii')
    except UnicodeDecodeError:
        raise UserError(f'{path}: {what} header is not ASCII text') from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith(('comment', '#'))], body


def _ascii_rows(path: Path, text: bytes, rows: int, width: int, what: str) -> np.ndarray:
    tokens = text.split()
    if len(tokens) < rows * width:
        raise UserError(f'{path}: truncated {what} data ({len(tokens)} values for {rows} points '
                        f'x {width})')
    try:
        return np.array(tokens[:rows * width], dtype=np.float64).reshape(rows, width)
    except ValueError as exc:
        raise UserError(f'{path}: bad number in {what} data ({exc})') from None


def _read_ply(path: Path, data: bytes) -> np.ndarray:
    if not data.startswith(b'ply'):
        raise UserError(f'{path}: not a PLY file (it does not start with "ply")')
    lines, offset = _split_header(path, data, b'end_header', 'PLY')
    fmt = None
    elements: list[tuple[str, int, list[tuple[str, ...]]]] = []
    for line in lines[1:]:
        words = line.split()
        if words[0] == 'format' and len(words) >= 2:
            if words[1] not in _PLY_FORMATS:
                raise UserError(f'{path}: unsupported PLY format {words[1]!r}')
            fmt = words[1]
        elif words[0] == 'element' and len(words) == 3 and words[2].isdigit():
            elements.append((words[1], int(words[2]), []))
        elif words[0] == 'property' and elements:
            props = elements[-1][2]
            if words[1] == 'list' and len(words) == 5:
                props.append(('list', words[2], words[3], words[4]))
            elif len(words) == 3 and words[1] in _PLY_TYPES:
                props.append((words[2], words[1]))
            else:
                raise UserError(f'{path}: bad PLY header line {line!r}')
        elif words[0] not in ('end_header', 'obj_info'):
            raise UserError(f'{path}: bad PLY header line {line!r}')
    if fmt is None:
        raise UserError(f'{path}: PLY header has no "format" line')
    names = [e[0] for e in elements]
    if 'vertex' not in names:
        raise UserError(f'{path}: PLY file has no vertex element')
    before = elements[:names.index('vertex')]
    _, count, props = elements[names.index('vertex')]
    if any(p[0] == 'list' for p in props):
        raise UserError(f'{path}: PLY vertex element with list properties is not supported')
    prop_names = [p[0] for p in props]
    repeated = sorted({n for n in prop_names if prop_names.count(n) > 1})
    if repeated:
        raise UserError(f'{path}: PLY vertex property {repeated[0]!r} is declared more than once')
    missing = [n for n in 'xyz' if n not in prop_names]
    if missing:
        raise UserError(f'{path}: PLY vertex element has no property {missing}')
    if fmt == 'ascii':
        skip = sum(e[1] for e in before)  # one line per item of the elements before
        body = data[offset:].split(b'\n', skip)[-1] if skip else data[offset:]
        rows = _ascii_rows(path, body, count, len(props), 'PLY')
        return _xyz([rows[:, prop_names.index(n)] for n in 'xyz'])
    order = _PLY_FORMATS[fmt]
    for name, n, element_props in before:
        if any(p[0] == 'list' for p in element_props):
            raise UserError(f'{path}: PLY element {name!r} with lists before the vertices is not '
                            'supported')
        offset += n * sum(np.dtype(_PLY_TYPES[p[1]]).itemsize for p in element_props)
    dtype = np.dtype([(p[0], order + _PLY_TYPES[p[1]]) for p in props])
    if len(data) < offset + count * dtype.itemsize:
        raise UserError(f'{path}: truncated PLY file ({count} vertices announced, '
                        f'{max(0, len(data) - offset) // dtype.itemsize} present)')
    vertices = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return _xyz([vertices[n] for n in 'xyz'])


def _read_pcd(path: Path, data: bytes) -> np.ndarray:
    lines, offset = _split_header(path, data, b'\nDATA', 'PCD')
    header: dict[str, list[str]] = {}
    for line in lines:
        key, *values = line.split()
        header[key.upper()] = values
    try:
        fields = header['FIELDS']
        sizes = [int(v) for v in header['SIZE']]
        kinds = header['TYPE']
        counts = [int(v) for v in header.get('COUNT', ['1'] * len(fields))]
        points = int(header['POINTS'][0]) if 'POINTS' in header else \
            int(header['WIDTH'][0]) * int(header['HEIGHT'][0])
        mode = header['DATA'][0].lower()
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f'{path}: bad PCD header ({type(exc).__name__}: {exc})') from None
    if not len(fields) == len(sizes) == len(kinds) == len(counts):
        raise UserError(f'{path}: PCD header FIELDS/SIZE/TYPE/COUNT lengths differ')
    missing = [n for n in 'xyz' if n not in fields]
    if missing:
        raise UserError(f'{path}: PCD file has no field {missing}')
    if points < 0:
        raise UserError(f'{path}: PCD header announces {points} points')
    for name, size, kind, count in zip(fields, sizes, kinds, counts, strict=True):
        if kind not in _PCD_KINDS or size not in _PCD_SIZES[kind]:
            raise UserError(f'{path}: PCD field {name!r} has unsupported TYPE {kind} SIZE {size}'
                            f' (TYPE F: SIZE 4 or 8; I and U: 1, 2, 4 or 8)')
        if count < 1 or (name in 'xyz' and count != 1):
            raise UserError(f'{path}: PCD field {name!r} has COUNT {count}'
                            f'{"; x, y and z need COUNT 1" if name in "xyz" else ""}')
    if mode == 'ascii':
        rows = _ascii_rows(path, data[offset:], points, sum(counts), 'PCD')
        starts = np.cumsum([0] + counts)
        return _xyz([rows[:, starts[fields.index(n)]] for n in 'xyz'])
    if mode != 'binary':
        raise UserError(f'{path}: PCD DATA {mode!r} is not supported (only ascii and binary); '
                        'convert it, e.g. with pcl_convert_pcd_ascii_binary')
    members = []
    for i, (name, size, kind, count) in enumerate(zip(fields, sizes, kinds, counts, strict=True)):
        base = f'<{_PCD_KINDS[kind]}{size}'
        unique = name if fields.index(name) == i else f'{name}__{i}'  # '_' padding repeats
        members.append((unique, base, (count,)) if count > 1 else (unique, base))
    try:
        dtype = np.dtype(members)
    except ValueError as exc:  # e.g. a field named like the stand-in of a repeated one
        raise UserError(f'{path}: bad PCD FIELDS line ({exc})') from None
    if len(data) < offset + points * dtype.itemsize:
        raise UserError(f'{path}: truncated PCD file ({points} points announced, '
                        f'{max(0, len(data) - offset) // dtype.itemsize} present)')
    cloud = np.frombuffer(data, dtype=dtype, count=points, offset=offset)
    return _xyz([cloud[n] for n in 'xyz'])


def check_output_file(path: str | os.PathLike, option: str = '--out') -> Path:
    """Check, before any work, that points can be written to `path`: a known suffix, not a
    directory, in an existing folder where files can be created (tried, not guessed from
    permission bits). Returns the path; UserError names the option and what is wrong."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise UserError(f'{option} {path}: unknown format; use one of {", ".join(SUFFIXES)}')
    if path.is_dir():
        raise UserError(f'{option} {path}: is a directory; give a file name such as '
                        f'{path / "completed.ply"}')
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f'{option} {path}: folder {folder} does not exist')
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=f'.{path.name}.probe-'):
            pass
    except OSError as exc:
        raise UserError(f'{option} {path}: cannot write in {folder} '
                        f'({exc.strerror or exc})') from None
    return path


def write_points(path: str | os.PathLike, xyz: np.ndarray, binary: bool = True) -> None:
    """Write (N, 3) points as float32 by suffix: .ply/.pcd (binary or ASCII), .npy, .bin (x4).

    A .bin gets KITTI's layout (x, y, z, remission = 0).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f'{path}: cannot write format {suffix or "(no suffix)"!r}; use one of '
                        f'{", ".join(SUFFIXES)}')
    points = np.ascontiguousarray(np.asarray(xyz, dtype='<f4'))
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f'write_points needs an (N, 3) array, got {points.shape}')
    if not path.parent.is_dir():
        raise UserError(f'{path}: output folder {path.parent} does not exist')
    try:
        _write_points(path, suffix, points, binary)
    except OSError as exc:  # a full disk, a folder that became read-only: nothing was replaced
        raise UserError(f'{path}: cannot write ({exc.strerror or exc}); no file was '
                        'written') from None


def _write_points(path: Path, suffix: str, points: np.ndarray, binary: bool) -> None:
    n = len(points)
    with atomic_writer(path) as out:
        if suffix == '.npy':
            np.save(out, points.astype(np.float32))
        elif suffix == '.bin':
            out.write(np.concatenate([points, np.zeros((n, 1), '<f4')], axis=1).tobytes())
        elif suffix == '.ply':
            fmt = 'binary_little_endian' if binary else 'ascii'
            out.write((f'ply\nformat {fmt} 1.0\ncomment written by distdpo_ros\n'
                       f'element vertex {n}\nproperty float x\nproperty float y\n'
                       'property float z\nend_header\n').encode('ascii'))
            out.write(points.tobytes() if binary else _ascii_body(points))
        else:
            out.write(('# .PCD v0.7 - written by distdpo_ros\nVERSION 0.7\nFIELDS x y z\n'
                       'SIZE 4 4 4\nTYPE F F F\nCOUNT 1 1 1\n'
                       f'WIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\n'
                       f'DATA {"binary" if binary else "ascii"}\n').encode('ascii'))
            out.write(points.tobytes() if binary else _ascii_body(points))


def _ascii_body(points: np.ndarray) -> bytes:
    if not len(points):
        return b''
    # 9 significant digits round-trip float32 exactly.
    return ('\n'.join(' '.join(f'{v:.9g}' for v in row) for row in points.tolist()) + '\n'
            ).encode('ascii')
