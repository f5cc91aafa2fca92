"""PointCloud2 <-> numpy: layouts against a per-point struct reference, round trips, errors."""

from __future__ import annotations

import math
import struct
from types import SimpleNamespace

import numpy as np
import pytest

from distdpo_ros import pointcloud as pc

FMT = {1: 'b', 2: 'B', 3: 'h', 4: 'H', 5: 'i', 6: 'I', 7: 'f', 8: 'd'}


def field(name, offset, datatype, count=1):
    return SimpleNamespace(name=name, offset=offset, datatype=datatype, count=count)


def cloud(fields, point_step, height, width, data, *, row_step=None, big=False):
    return SimpleNamespace(header=None, height=height, width=width, fields=fields,
                           is_bigendian=big, point_step=point_step,
                           row_step=width * point_step if row_step is None else row_step,
                           data=data, is_dense=False)


def encode(fields, point_step, rows, *, row_step=None, big=False):
    """Per-point writer: rows[r][c] maps field name -> value (or tuple for count > 1)."""
    height, width = len(rows), len(rows[0])
    row_step = width * point_step if row_step is None else row_step
    buf = bytearray(b'\xa5' * (row_step * height))  # garbage in the padding on purpose
    order = '>' if big else '<'
    for r, row in enumerate(rows):
        for c, point in enumerate(row):
            for f in fields:
                values = point[f.name] if f.count > 1 else (point[f.name],)
                struct.pack_into(order + FMT[f.datatype] * f.count, buf,
                                 r * row_step + c * point_step + f.offset, *values)
    return cloud(fields, point_step, height, width, bytes(buf), row_step=row_step, big=big)


def reference_read(msg, extra=()):
    """The straightforward implementation: struct.unpack_from per point and field."""
    order = '>' if msg.is_bigendian else '<'
    by_name = {f.name: f for f in msg.fields}
    xyz, extras = [], {name: [] for name in extra}
    for r in range(msg.height):
        for c in range(msg.width):
            base = r * msg.row_step + c * msg.point_step
            point = [struct.unpack_from(order + FMT[by_name[n].datatype], msg.data,
                                        base + by_name[n].offset)[0] for n in 'xyz']
            if not all(math.isfinite(v) for v in point):
                continue
            xyz.append(point)
            for name in extra:
                f = by_name[name]
                values = struct.unpack_from(order + FMT[f.datatype] * f.count, msg.data,
                                            base + f.offset)
                extras[name].append(values[0] if f.count == 1 else values)
    return np.array(xyz, dtype=np.float32).reshape(-1, 3), extras


def random_rows(fields, height, width, seed, nan_fraction=0.1):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(height):
        row = []
        for _ in range(width):
            point = {}
            for f in fields:
                if f.datatype in (7, 8):
                    vals = [float(rng.normal() * 30) for _ in range(f.count)]
                else:
                    info = np.iinfo(pc.DATATYPES[f.datatype])
                    vals = [int(rng.integers(info.min, info.max, endpoint=True))
                            for _ in range(f.count)]
                point[f.name] = vals[0] if f.count == 1 else tuple(vals)
            if rng.random() < nan_fraction:
                point[rng.choice(['x', 'y', 'z'])] = rng.choice([math.nan, math.inf, -math.inf])
            row.append(point)
        rows.append(row)
    return rows


VELODYNE = [field('x', 0, 7), field('y', 4, 7), field('z', 8, 7), field('intensity', 12, 7),
            field('ring', 16, 4), field('time', 18, 7)]
LAYOUTS = {
    # name: (fields, point_step, height, width, row_step, big-endian, extra fields to read)
    'velodyne_packed_22': (VELODYNE, 22, 1, 37, None, False, ('intensity', 'ring', 'time')),
    'velodyne_organized': (VELODYNE, 22, 4, 9, None, False, ('ring',)),
    'pcl_padded_32': ([field('x', 0, 7), field('y', 4, 7), field('z', 8, 7),
                       field('intensity', 16, 7)], 32, 1, 20, None, False, ('intensity',)),
    'float64_xyz': ([field('x', 0, 8), field('y', 8, 8), field('z', 16, 8)], 24, 1, 15, None,
                    False, ()),
    'big_endian': (VELODYNE, 22, 2, 7, None, True, ('intensity', 'ring', 'time')),
    'big_endian_float64_row_padding': ([field('z', 0, 8), field('x', 8, 8), field('y', 16, 8),
                                        field('t', 24, 6)], 32, 3, 5, 5 * 32 + 12, True, ('t',)),
    'shuffled_fields_row_padding': ([field('i', 0, 2), field('y', 1, 7), field('z', 9, 7),
                                     field('x', 13, 7)], 20, 3, 6, 6 * 20 + 7, False, ('i',)),
    'ouster_like': ([field('x', 0, 7), field('y', 4, 7), field('z', 8, 7),
                     field('intensity', 16, 7), field('t', 20, 6), field('reflectivity', 24, 4),
                     field('ring', 26, 2), field('ambient', 28, 4), field('range', 32, 6)],
                    48, 4, 8, None, False, ('t', 'reflectivity', 'ring', 'ambient', 'range')),
    'signed_and_count_fields': ([field('x', 0, 7), field('y', 4, 7), field('z', 8, 7),
                                 field('rgb', 12, 1, 3), field('n', 15, 5, 2),
                                 field('s', 23, 3)], 25, 2, 6, None, False, ('rgb', 'n', 's')),
}


@pytest.mark.parametrize('name', sorted(LAYOUTS))
def test_reader_agrees_with_per_point_reference(name):
    fields, point_step, height, width, row_step, big, extra = LAYOUTS[name]
    msg = encode(fields, point_step, random_rows(fields, height, width, seed=len(name)),
                 row_step=row_step, big=big)
    original = bytes(msg.data)
    xyz, extras = pc.cloud_to_arrays(msg, extra)
    ref_xyz, ref_extras = reference_read(msg, extra)
    assert xyz.dtype == np.float32 and xyz.flags.c_contiguous
    np.testing.assert_array_equal(xyz, ref_xyz)
    for key in extra:
        want = np.array(ref_extras[key])
        assert extras[key].dtype == pc.DATATYPES[{f.name: f for f in fields}[key].datatype]
        assert extras[key].dtype.isnative
        np.testing.assert_array_equal(extras[key], want)
    assert msg.data == original  # big-endian data is converted on copy, never in place


@pytest.mark.parametrize('data_kind', ['bytes', 'array', 'ndarray', 'list'])
def test_reader_accepts_every_buffer_type(data_kind):
    import array

    rows = random_rows(VELODYNE, 1, 5, seed=3, nan_fraction=0)
    msg = encode(VELODYNE, 22, rows)
    raw = msg.data
    msg.data = {'bytes': raw, 'array': array.array('B', raw),
                'ndarray': np.frombuffer(raw, np.uint8), 'list': list(raw)}[data_kind]
    expected = reference_read(encode(VELODYNE, 22, rows))[0]
    np.testing.assert_array_equal(pc.cloud_to_xyz(msg), expected)


def test_nonfinite_points_are_dropped_or_kept_on_request():
    xyz = np.array([[1, 2, 3], [np.nan, 0, 0], [0, np.inf, 0], [4, 5, -np.inf], [7, 8, 9]],
                   np.float32)
    msg = pc.make_cloud(xyz, None, {'i': np.arange(5, dtype=np.uint8)},
                        cloud_type=SimpleNamespace, field_type=SimpleNamespace)
    assert not msg.is_dense
    got, extras = pc.cloud_to_arrays(msg, ['i'])
    np.testing.assert_array_equal(got, xyz[[0, 4]])
    np.testing.assert_array_equal(extras['i'], [0, 4])
    kept = pc.cloud_to_xyz(msg, remove_nonfinite=False)
    np.testing.assert_array_equal(kept, xyz)  # NaN compare equal in assert_array_equal


def test_structured_view_is_zero_copy_and_read_only():
    msg = encode(VELODYNE, 22, random_rows(VELODYNE, 3, 4, seed=1), row_step=4 * 22 + 2)
    view = pc.structured_view(msg)
    assert view.shape == (3, 4) and view.dtype.itemsize == 22
    assert not view.flags.writeable
    assert np.shares_memory(view, np.frombuffer(msg.data, np.uint8))
    with pytest.raises(ValueError):
        view['x'][0, 0] = 1.0


EXTRA_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.float32,
                np.float64]


def test_writer_round_trip_with_every_extra_datatype():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(50, 3)).astype(np.float32)
    extra = {f'f{i}': (rng.random(50) * 100).astype(dt) for i, dt in enumerate(EXTRA_DTYPES)}
    extra['vec'] = rng.random((50, 3)).astype(np.float64)
    extra['flag'] = rng.random(50) > 0.5
    msg = pc.make_cloud(xyz, 'hdr', extra, cloud_type=SimpleNamespace,
                        field_type=SimpleNamespace)
    assert (msg.header, msg.height, msg.width, msg.is_bigendian) == ('hdr', 1, 50, False)
    assert msg.row_step == 50 * msg.point_step
    assert msg.point_step == 12 + sum(np.dtype(dt).itemsize for dt in EXTRA_DTYPES) + 24 + 1
    got, extras = pc.cloud_to_arrays(msg, list(extra))
    np.testing.assert_array_equal(got, xyz)
    ref_xyz, ref_extras = reference_read(msg, list(extra))
    np.testing.assert_array_equal(ref_xyz, xyz)
    for name, values in extra.items():
        np.testing.assert_array_equal(extras[name], values)
        np.testing.assert_array_equal(np.array(ref_extras[name]), values)


def test_writer_converts_float64_points_and_rejects_bad_input():
    xyz = np.array([[0.1, 0.2, 0.3]], np.float64)
    msg = pc.make_cloud(xyz, None, cloud_type=SimpleNamespace, field_type=SimpleNamespace)
    assert [f.datatype for f in msg.fields] == [pc.FLOAT32] * 3 and msg.is_dense
    np.testing.assert_array_equal(pc.cloud_to_xyz(msg), xyz.astype(np.float32))
    with pytest.raises(pc.UserError, match=r'shape \(N, 3\)'):
        pc.pack_points(np.zeros((4, 2)))
    with pytest.raises(pc.UserError, match='extra field .c. has dtype complex'):
        pc.pack_points(np.zeros((2, 3)), {'c': np.zeros(2, np.complex64)})
    with pytest.raises(pc.UserError, match=r'extra field .i. must have shape \(2,\)'):
        pc.pack_points(np.zeros((2, 3)), {'i': np.zeros(3)})


def test_rclpy_message_round_trip_through_cdr():
    serialization = pytest.importorskip('rclpy.serialization')
    msgs = pytest.importorskip('sensor_msgs.msg')
    from std_msgs.msg import Header

    rng = np.random.default_rng(1)
    xyz = rng.normal(size=(1000, 3)).astype(np.float32)
    ring = rng.integers(0, 64, 1000).astype(np.uint16)
    header = Header(frame_id='velodyne')
    header.stamp.sec, header.stamp.nanosec = 12, 345
    msg = pc.make_cloud(xyz, header, {'ring': ring})
    assert type(msg.data).__name__ == 'array'
    back = serialization.deserialize_message(serialization.serialize_message(msg),
                                             msgs.PointCloud2)
    assert back.header.frame_id == 'velodyne' and back.header.stamp.nanosec == 345
    got, extras = pc.cloud_to_arrays(back, ['ring'])
    np.testing.assert_array_equal(got, xyz)
    np.testing.assert_array_equal(extras['ring'], ring)


def test_rosbags_message_round_trip_through_cdr():
    typesys = pytest.importorskip('rosbags.typesys')
    store = typesys.get_typestore(typesys.Stores.ROS2_HUMBLE)
    cloud_t = store.types['sensor_msgs/msg/PointCloud2']
    field_t = store.types['sensor_msgs/msg/PointField']
    header_t = store.types['std_msgs/msg/Header']
    time_t = store.types['builtin_interfaces/msg/Time']
    xyz = np.random.default_rng(2).normal(size=(300, 3)).astype(np.float32)
    intensity = np.linspace(0, 1, 300, dtype=np.float32)
    msg = pc.make_cloud(xyz, header_t(stamp=time_t(sec=5, nanosec=6), frame_id='velodyne'),
                        {'intensity': intensity}, cloud_type=cloud_t, field_type=field_t)
    assert isinstance(msg.data, np.ndarray) and msg.data.dtype == np.uint8
    back = store.deserialize_cdr(store.serialize_cdr(msg, cloud_t.__msgtype__),
                                 cloud_t.__msgtype__)
    got, extras = pc.cloud_to_arrays(back, ['intensity'])
    np.testing.assert_array_equal(got, xyz)
    np.testing.assert_array_equal(extras['intensity'], intensity)


def good_velodyne(width=8):
    return encode(VELODYNE, 22, random_rows(VELODYNE, 1, width, seed=4, nan_fraction=0))


def with_changes(msg, **changes):
    return SimpleNamespace(**{**vars(msg), **changes})


def invalid_messages():
    """(reason, regex the message must match, broken message) for each kind of malformation."""
    good = good_velodyne()
    nan = encode(VELODYNE, 22, [[{**p, 'x': math.nan} for p in random_rows(VELODYNE, 1, 4, 5)[0]]])
    no_x = [f for f in VELODYNE if f.name != 'x']
    return [
        ('empty', 'empty cloud', with_changes(good, width=0, data=b'')),
        ('empty', 'empty cloud', with_changes(good, height=0)),
        ('no_finite_points', 'none of the 4 points', nan),
        ('missing_field', "field 'x' is missing", with_changes(good, fields=no_x)),
        ('unsupported_datatype', "field 'y' has datatype 9",
         with_changes(good, fields=[field('x', 0, 7), field('y', 4, 9), field('z', 8, 7)])),
        ('unsupported_datatype', "field 'z' must be one float32 or float64, got uint32",
         with_changes(good, fields=[field('x', 0, 7), field('y', 4, 7), field('z', 8, 6)])),
        ('unsupported_datatype', 'float32 x 2',
         with_changes(good, fields=[field('x', 0, 7, 2), field('y', 8, 7), field('z', 12, 7)])),
        ('truncated', 'data has 175 bytes, the layout needs 176',
         with_changes(good, data=good.data[:-1])),
        ('truncated', 'data has 176 bytes, the layout needs 352',
         with_changes(good, height=2)),
        ('bad_layout', 'row_step=100 is smaller than width', with_changes(good, row_step=100)),
        ('bad_layout', r"field 'z' \(offset 8, 4 bytes\) exceeds point_step 10",
         with_changes(good, point_step=10, row_step=80)),
        ('bad_layout', 'point_step=0', with_changes(good, point_step=0)),
        ('bad_layout', 'negative size', with_changes(good, width=-3)),
        ('bad_layout', "field 'x' is declared more than once",
         with_changes(good, fields=VELODYNE + [field('x', 12, 7)])),
        ('bad_layout', "field 'x' has count 0",
         with_changes(good, fields=[field('x', 0, 7, 0)] + VELODYNE[1:])),
        ('too_large', 'exceeds the limit of 4000000', with_changes(good, height=2000,
                                                                   width=3000)),
        ('too_large', 'point_step=100000', with_changes(good, point_step=100000)),
        ('bad_message', 'not a PointCloud2', SimpleNamespace(height=1)),
        ('bad_message', 'data is not a byte buffer', with_changes(good, data=3.5)),
        ('bad_message', 'outside 0..255', with_changes(good, data=[300] * 176)),
    ]


@pytest.mark.parametrize('reason,pattern,msg', invalid_messages(),
                         ids=[f'{r}-{i}' for i, (r, _, _) in enumerate(invalid_messages())])
def test_malformed_clouds_raise_cloud_error_naming_the_reason(reason, pattern, msg):
    with pytest.raises(pc.CloudError, match=pattern) as info:
        pc.cloud_to_xyz(msg)
    assert info.value.reason == reason
    assert isinstance(info.value, pc.UserError)


def test_unread_fields_with_odd_layouts_do_not_matter_and_requested_ones_do():
    odd = VELODYNE + [field('weird', 20, 42)]  # unknown datatype, not needed for xyz
    msg = encode(VELODYNE, 22, random_rows(VELODYNE, 1, 6, seed=6, nan_fraction=0))
    msg.fields = odd
    np.testing.assert_array_equal(pc.cloud_to_xyz(msg), reference_read(msg)[0])
    with pytest.raises(pc.CloudError, match="field 'weird' has datatype 42"):
        pc.cloud_to_arrays(msg, ['weird'])
    with pytest.raises(pc.CloudError, match="field 'nope' is missing"):
        pc.cloud_to_arrays(msg, ['nope'])
    assert pc.field_names(msg)[-1] == 'weird'


def test_max_points_limit_is_configurable():
    msg = good_velodyne(width=8)
    with pytest.raises(pc.CloudError, match='exceeds the limit of 7') as info:
        pc.cloud_to_xyz(msg, max_points=7)
    assert info.value.reason == 'too_large'
    assert pc.cloud_to_xyz(msg, max_points=8).shape == (8, 3)
