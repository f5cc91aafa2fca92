"""sensor_msgs/PointCloud2 <-> numpy without per-point Python loops.

Every function is duck-typed: it takes any object with the PointCloud2 attributes (`header`,
`height`, `width`, `fields` of objects with `name`, `offset`, `datatype`, `count`, `is_bigendian`,
`point_step`, `row_step`, `data`, `is_dense`), so the same code reads rclpy messages
(`sensor_msgs.msg.PointCloud2`, `data` an `array.array('B')`) and the `rosbags` dataclasses (`data`
a uint8 ndarray) used by the bag tools.

Reading builds a structured dtype from the message's own `fields`, `point_step` and byte order and
lays it over `data` with the row and point strides: a zero-copy, read-only view that handles any
field order, padding, row padding, organised clouds (height > 1) and big-endian data (numpy
converts while copying out; the message is never modified). Only the fields asked for enter the
dtype, so unusual fields a caller does not need never get in the way.

Malformed messages raise :class:`CloudError`, whose `reason` is one of :data:`REASONS` (a stable
key for counters) and whose text names the offending field or size.
"""

from __future__ import annotations

import array
import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from distdpo_ros.errors import UserError

# sensor_msgs/PointField datatype constants.
INT8, UINT8, INT16, UINT16, INT32, UINT32, FLOAT32, FLOAT64 = range(1, 9)
DATATYPES: dict[int, np.dtype] = {
    INT8: np.dtype('i1'), UINT8: np.dtype('u1'), INT16: np.dtype('i2'), UINT16: np.dtype('u2'),
    INT32: np.dtype('i4'), UINT32: np.dtype('u4'), FLOAT32: np.dtype('f4'),
    FLOAT64: np.dtype('f8'),
}
_DATATYPE_OF_KIND = {(dt.kind, dt.itemsize): code for code, dt in DATATYPES.items()}
XYZ = ('x', 'y', 'z')

# Sizes beyond these are rejected before any buffer is touched. 4 M points is ten times the
# densest automotive LiDAR sweep; a point wider than 4 KiB is not a point.
MAX_POINTS = 4_000_000
MAX_POINT_STEP = 4096

REASONS = ('bad_message', 'empty', 'too_large', 'bad_layout', 'missing_field',
           'unsupported_datatype', 'truncated', 'no_finite_points')


class CloudError(UserError):
    """A PointCloud2 that cannot be read; `reason` is one of REASONS, the text names the cause."""

    def __init__(self, reason: str, message: str) -> None:
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Field:
    """One PointField as plain data: name, byte offset in a point, datatype code, count."""

    name: str
    offset: int
    datatype: int
    count: int = 1


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------

def field_names(msg: Any) -> list[str]:
    """Names of the message's fields in their declared order."""
    return [str(f.name) for f in msg.fields]


def _layout(msg: Any, max_points: int) -> tuple[int, int, int, int, bool]:
    """Validate the size attributes; return (height, width, point_step, row_step, big-endian)."""
    try:
        height, width = int(msg.height), int(msg.width)
        point_step, row_step = int(msg.point_step), int(msg.row_step)
        big = bool(msg.is_bigendian)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CloudError('bad_message', f'not a PointCloud2: {exc}') from exc
    if min(height, width, point_step, row_step) < 0:
        raise CloudError('bad_layout', f'negative size: height={height} width={width} '
                         f'point_step={point_step} row_step={row_step}')
    if height * width == 0:
        raise CloudError('empty', f'empty cloud (height={height}, width={width})')
    if height * width > max_points:
        raise CloudError('too_large', f'{height} x {width} = {height * width} points exceeds the '
                         f'limit of {max_points}')
    if point_step == 0 or point_step > MAX_POINT_STEP:
        raise CloudError('bad_layout' if point_step == 0 else 'too_large',
                         f'point_step={point_step} outside 1..{MAX_POINT_STEP}')
    if row_step < width * point_step:
        raise CloudError('bad_layout', f'row_step={row_step} is smaller than width * point_step '
                         f'= {width} * {point_step}')
    return height, width, point_step, row_step, big


def _field_map(msg: Any) -> tuple[dict[str, Field], set[str]]:
    """Fields by name, and the names declared more than once (an error only when read)."""
    fields: dict[str, Field] = {}
    repeated: set[str] = set()
    try:
        for f in msg.fields:
            field = Field(str(f.name), int(f.offset), int(f.datatype), int(f.count))
            if field.name in fields:
                repeated.add(field.name)
            fields[field.name] = field
    except (AttributeError, TypeError, ValueError) as exc:
        raise CloudError('bad_message', f'unreadable PointCloud2 fields: {exc}') from exc
    return fields, repeated


def cloud_dtype(msg: Any, names: Sequence[str] | None = None) -> np.dtype:
    """Structured dtype (itemsize point_step, message byte order) holding the named fields.

    `names=None` takes every declared field. Raises CloudError for a missing field, a datatype
    that is not a PointField constant, a field that leaves the point, or a repeated name.
    """
    _, _, point_step, _, big = _layout(msg, MAX_POINTS)
    return _dtype(msg, names, point_step, big)


def _dtype(msg: Any, names: Sequence[str] | None, point_step: int, big: bool) -> np.dtype:
    fields, repeated = _field_map(msg)
    wanted = list(fields) if names is None else list(names)
    order = '>' if big else '<'
    formats, offsets = [], []
    for name in wanted:
        field = fields.get(name)
        if field is None:
            raise CloudError('missing_field', f'field {name!r} is missing (fields: '
                             f'{", ".join(fields) or "none"})')
        if name in repeated:
            raise CloudError('bad_layout', f'field {name!r} is declared more than once')
        base = DATATYPES.get(field.datatype)
        if base is None:
            raise CloudError('unsupported_datatype', f'field {name!r} has datatype '
                             f'{field.datatype}, not a PointField constant 1..8')
        if field.count < 1:
            raise CloudError('bad_layout', f'field {name!r} has count {field.count}')
        if field.offset < 0 or field.offset + base.itemsize * field.count > point_step:
            raise CloudError('bad_layout', f'field {name!r} (offset {field.offset}, '
                             f'{base.itemsize * field.count} bytes) exceeds point_step '
                             f'{point_step}')
        fmt = base.newbyteorder(order)
        formats.append(fmt if field.count == 1 else (fmt, (field.count,)))
        offsets.append(field.offset)
    return np.dtype({'names': wanted, 'formats': formats, 'offsets': offsets,
                     'itemsize': point_step})


def _buffer(msg: Any) -> np.ndarray:
    data = msg.data
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError):
        pass
    try:  # a list of ints: legal in rclpy before the setter converts it, and in hand-made tests
        values = np.asarray(data)
    except (TypeError, ValueError) as exc:
        raise CloudError('bad_message', f'data is not a byte buffer: {exc}') from exc
    if values.ndim != 1 or values.dtype.kind not in 'iu':
        raise CloudError('bad_message', f'data is not a byte buffer ({type(data).__name__})')
    if values.size and (values.min() < 0 or values.max() > 255):
        raise CloudError('bad_message', 'data holds values outside 0..255')
    return values.astype(np.uint8)


def structured_view(msg: Any, names: Sequence[str] | None = None,
                    max_points: int = MAX_POINTS) -> np.ndarray:
    """Zero-copy read-only (height, width) structured view of the named fields of `msg.data`."""
    height, width, point_step, row_step, big = _layout(msg, max_points)
    dtype = _dtype(msg, names, point_step, big)
    buf = _buffer(msg)
    needed = (height - 1) * row_step + width * point_step
    if buf.size < needed:
        raise CloudError('truncated', f'data has {buf.size} bytes, the layout needs {needed} '
                         f'({height} rows of {row_step} bytes, {width} points of {point_step})')
    view = np.ndarray((height, width), dtype=dtype, buffer=buf,
                      strides=(row_step, point_step))
    view.flags.writeable = False
    return view


def _xyz_columns(view: np.ndarray) -> np.ndarray | None:
    """(height, width, 3) float32 view when x, y, z are three adjacent float32 (the common case:
    one strided copy instead of three)."""
    fx, fy, fz = (view.dtype.fields[n] for n in XYZ)
    if not all(f[0].base.kind == 'f' and f[0].base.itemsize == 4 and f[0].shape == ()
               for f in (fx, fy, fz)):
        return None
    if not (fy[1] == fx[1] + 4 and fz[1] == fx[1] + 8):
        return None
    block = np.dtype({'names': ['xyz'], 'formats': [(fx[0], (3,))], 'offsets': [fx[1]],
                      'itemsize': view.dtype.itemsize})
    return view.view(block)['xyz']


def cloud_to_arrays(msg: Any, extra_fields: Sequence[str] = (), *,
                    remove_nonfinite: bool = True,
                    max_points: int = MAX_POINTS) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Read (N, 3) float32 xyz and the named extra fields ((N,) or (N, count), native order).

    Points are in row-major order (row by row of an organised cloud). With `remove_nonfinite`,
    points with a NaN or infinite coordinate are dropped (whatever `is_dense` claims) and a cloud
    left with none raises CloudError('no_finite_points').
    """
    extra = [n for n in extra_fields if n not in XYZ]
    view = structured_view(msg, list(XYZ) + extra, max_points)
    for name in XYZ:
        base = view.dtype.fields[name][0]
        if base.kind != 'f' or base.shape != ():
            raise CloudError('unsupported_datatype', f'field {name!r} must be one float32 or '
                             f'float64, got {base.base.name}' + (
                                 f' x {base.shape[0]}' if base.shape else ''))
    height, width = view.shape
    xyz = np.empty((height, width, 3), dtype=np.float32)
    block = _xyz_columns(view)
    with np.errstate(over='ignore'):  # float64 beyond float32 range becomes inf, then filtered
        if block is not None:
            xyz[...] = block
        else:
            for i, name in enumerate(XYZ):
                xyz[..., i] = view[name]
    xyz = xyz.reshape(-1, 3)
    keep = None
    if remove_nonfinite:
        finite = np.isfinite(xyz)
        if not finite.all():  # (fast; `.all(axis=1)` on (N, 3) is ten times slower)
            keep = finite[:, 0] & finite[:, 1] & finite[:, 2]
            if not keep.any():
                raise CloudError('no_finite_points', f'none of the {xyz.shape[0]} points has '
                                 'finite x, y, z')
            # Rows as 12-byte items: boolean indexing of (N, 3) float32 is ten times slower.
            xyz = xyz.view(np.dtype((np.void, 12))).ravel()[keep].view(np.float32)
            xyz = xyz.reshape(-1, 3)
    extras: dict[str, np.ndarray] = {}
    for name in extra:
        column = view[name]
        values = np.array(column, dtype=column.dtype.base.newbyteorder('='))
        values = values.reshape(height * width, *column.shape[2:])
        extras[name] = values[keep] if keep is not None else values
    return xyz, extras


def cloud_to_xyz(msg: Any, *, remove_nonfinite: bool = True,
                 max_points: int = MAX_POINTS) -> np.ndarray:
    """(N, 3) float32 xyz of a PointCloud2; see :func:`cloud_to_arrays`."""
    return cloud_to_arrays(msg, (), remove_nonfinite=remove_nonfinite, max_points=max_points)[0]


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class PackedCloud:
    """The layout and bytes of an unorganised little-endian cloud, ready for any message type."""

    fields: list[Field]
    point_step: int
    width: int
    data: np.ndarray  # uint8, width * point_step bytes
    is_dense: bool

    @property
    def row_step(self) -> int:
        return self.width * self.point_step


def pack_points(xyz: np.ndarray, extra: Mapping[str, np.ndarray] | None = None) -> PackedCloud:
    """Pack (N, 3) xyz as float32 x, y, z plus extra per-point fields, with no padding.

    Each extra array has N rows ((N,) or (N, count)); its dtype picks the PointField datatype
    (bool is stored as uint8, other kinds must map to one of the eight PointField types).
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise UserError(f'points must have shape (N, 3), got {xyz.shape}')
    n = xyz.shape[0]
    fields = [Field(name, 4 * i, FLOAT32, 1) for i, name in enumerate(XYZ)]
    names, formats, offsets = list(XYZ), ['<f4'] * 3, [0, 4, 8]
    columns: list[np.ndarray] = []
    offset = 12
    for name, values in (extra or {}).items():
        values = np.asarray(values)
        if values.dtype == np.bool_:
            values = values.astype(np.uint8)
        if name in names:
            raise UserError(f'extra field {name!r} repeats a field name')
        if values.shape[:1] != (n,) or values.ndim > 2:
            raise UserError(f'extra field {name!r} must have shape ({n},) or ({n}, count), '
                            f'got {values.shape}')
        code = _DATATYPE_OF_KIND.get((values.dtype.kind, values.dtype.itemsize))
        if code is None:
            raise UserError(f'extra field {name!r} has dtype {values.dtype}, which no '
                            'PointField datatype represents')
        count = 1 if values.ndim == 1 else values.shape[1]
        base = DATATYPES[code].newbyteorder('<')
        fields.append(Field(name, offset, code, count))
        names.append(name)
        formats.append(base if count == 1 else (base, (count,)))
        offsets.append(offset)
        columns.append(values)
        offset += base.itemsize * count
    packed = np.empty(n, dtype=np.dtype({'names': names, 'formats': formats,
                                         'offsets': offsets, 'itemsize': offset}))
    for i, name in enumerate(XYZ):
        packed[name] = xyz[:, i]
    for name, values in zip(names[3:], columns, strict=True):
        packed[name] = values
    dense = bool(np.isfinite(xyz).all()) if xyz.dtype.kind == 'f' else True
    return PackedCloud(fields, offset, n, packed.view(np.uint8).reshape(-1), dense)


def make_cloud(xyz: np.ndarray, header: Any, extra: Mapping[str, np.ndarray] | None = None, *,
               cloud_type: type | None = None, field_type: type | None = None) -> Any:
    """Build a PointCloud2 message of x, y, z float32 (+ extra fields) with the given header.

    Without types it builds an rclpy `sensor_msgs.msg.PointCloud2` (data as `array.array('B')`,
    which rclpy does not validate byte by byte). Pass the rosbags classes (`cloud_type`,
    `field_type`) to get a rosbags message (data as a uint8 ndarray).
    """
    if cloud_type is None or field_type is None:
        from sensor_msgs.msg import PointCloud2, PointField

        cloud_type, field_type = cloud_type or PointCloud2, field_type or PointField
    packed = pack_points(xyz, extra)
    fields = [field_type(name=f.name, offset=f.offset, datatype=f.datatype, count=f.count)
              for f in packed.fields]
    layout = {'header': header, 'height': 1, 'width': packed.width, 'fields': fields,
              'is_bigendian': False, 'point_step': packed.point_step,
              'row_step': packed.row_step, 'is_dense': packed.is_dense}
    if dataclasses.is_dataclass(cloud_type):  # rosbags message classes are dataclasses
        return cloud_type(**layout, data=packed.data)
    # rclpy copies `data` twice when it is given to the constructor, once when it is assigned.
    msg = cloud_type(**layout)
    data = array.array('B')
    data.frombytes(packed.data)
    msg.data = data
    return msg
