"""Point cloud file reading/writing (.bin .npy .ply .pcd) without open3d in the runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distdpo_ros.atomic import atomic_writer
from distdpo_ros.errors import UserError
from distdpo_ros.pointio import read_points, write_points


@pytest.fixture
def cloud() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.normal(size=(257, 3)) * [20, 20, 2]).astype(np.float32)


@pytest.mark.parametrize('suffix', ['.bin', '.npy', '.ply', '.pcd'])
@pytest.mark.parametrize('binary', [True, False])
def test_round_trip_is_exact(tmp_path: Path, cloud: np.ndarray, suffix: str, binary: bool) -> None:
    path = tmp_path / f'cloud{suffix}'
    write_points(path, cloud, binary=binary)
    back = read_points(path)
    assert back.dtype == np.float32 and back.shape == cloud.shape
    np.testing.assert_array_equal(back, cloud)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_kitti_bin_keeps_xyz_and_other_widths(tmp_path: Path, cloud: np.ndarray) -> None:
    rows = np.concatenate([cloud, np.full((len(cloud), 2), 0.5, np.float32)], axis=1)
    (tmp_path / 'five.bin').write_bytes(rows.tobytes())
    np.testing.assert_array_equal(read_points(tmp_path / 'five.bin', bin_columns=5), cloud)
    (tmp_path / 'bad.bin').write_bytes(rows.tobytes()[:-3])
    with pytest.raises(UserError, match='truncated'):
        read_points(tmp_path / 'bad.bin')


def test_written_files_open_in_open3d(tmp_path: Path, cloud: np.ndarray) -> None:
    o3d = pytest.importorskip('open3d')
    for suffix in ('.ply', '.pcd'):
        for binary in (True, False):
            path = tmp_path / f'c{int(binary)}{suffix}'
            write_points(path, cloud, binary=binary)
            ours = np.asarray(o3d.io.read_point_cloud(str(path)).points)
            np.testing.assert_allclose(ours, cloud, atol=1e-5)


def test_reads_open3d_files_with_colors_and_normals(tmp_path: Path, cloud: np.ndarray) -> None:
    o3d = pytest.importorskip('open3d')
    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(cloud.astype(np.float64)))
    pcd.colors = o3d.utility.Vector3dVector(np.random.default_rng(1).random((len(cloud), 3)))
    pcd.normals = o3d.utility.Vector3dVector(np.tile([0.0, 0.0, 1.0], (len(cloud), 1)))
    for suffix in ('.ply', '.pcd'):
        for ascii_ in (False, True):
            path = tmp_path / f'o3d{int(ascii_)}{suffix}'
            assert o3d.io.write_point_cloud(str(path), pcd, write_ascii=ascii_)
            np.testing.assert_allclose(read_points(path), cloud, atol=1e-4, err_msg=str(path))


def test_ply_with_other_elements_and_big_endian(tmp_path: Path, cloud: np.ndarray) -> None:
    n = len(cloud)
    header = ('ply\nformat binary_big_endian 1.0\ncomment test\nelement camera 2\n'
              'property float fx\nproperty uchar id\n'
              f'element vertex {n}\nproperty uchar r\nproperty double x\nproperty double y\n'
              'property double z\nelement face 1\nproperty list uchar int vertex_indices\n'
              'end_header\n')
    camera = np.zeros(2, dtype=[('fx', '>f4'), ('id', 'u1')]).tobytes()
    vertex = np.zeros(n, dtype=[('r', 'u1'), ('x', '>f8'), ('y', '>f8'), ('z', '>f8')])
    for i, name in enumerate('xyz'):
        vertex[name] = cloud[:, i]
    face = bytes([3]) + np.array([0, 1, 2], '>i4').tobytes()
    path = tmp_path / 'scene.ply'
    path.write_bytes(header.encode() + camera + vertex.tobytes() + face)
    np.testing.assert_array_equal(read_points(path), cloud)
    ascii_header = header.replace('binary_big_endian', 'ascii')
    lines = ['1.5 7', '2.5 8'] + [f'9 {x!r} {y!r} {z!r}' for x, y, z in cloud.tolist()]
    path.write_text(ascii_header + '\n'.join(lines + ['3 0 1 2']) + '\n')
    np.testing.assert_array_equal(read_points(path), cloud)


def test_pcd_with_padding_counts_and_nan(tmp_path: Path) -> None:
    dtype = np.dtype([('x', '<f4'), ('y', '<f4'), ('z', '<f4'), ('_', 'u1', (4,)),
                      ('intensity', '<f4'), ('ring', '<u2'), ('t', '<f8', (2,))])
    rows = np.zeros(3, dtype)
    rows['x'], rows['y'], rows['z'] = [1, 2, np.nan], [4, 5, 6], [7, 8, 9]
    header = ('# .PCD v0.7\nVERSION 0.7\nFIELDS x y z _ intensity ring t\n'
              'SIZE 4 4 4 1 4 2 8\nTYPE F F F U F U F\nCOUNT 1 1 1 4 1 1 2\nWIDTH 3\nHEIGHT 1\n'
              'VIEWPOINT 0 0 0 1 0 0 0\nPOINTS 3\nDATA binary\n')
    path = tmp_path / 'velodyne.pcd'
    path.write_bytes(header.encode() + rows.tobytes())
    xyz = read_points(path)
    np.testing.assert_array_equal(xyz[:2], [[1, 4, 7], [2, 5, 8]])
    assert np.isnan(xyz[2, 0])
    path.write_bytes(header.encode() + rows.tobytes()[:-1])
    with pytest.raises(UserError, match='truncated PCD'):
        read_points(path)
    path.write_text(header.replace('binary', 'binary_compressed'))
    with pytest.raises(UserError, match='binary_compressed'):
        read_points(path)


def test_npy_plain_and_structured(tmp_path: Path, cloud: np.ndarray) -> None:
    np.save(tmp_path / 'a.npy', np.concatenate([cloud, cloud[:, :1]], axis=1).astype(np.float64))
    np.testing.assert_array_equal(read_points(tmp_path / 'a.npy'), cloud)
    structured = np.zeros(len(cloud), dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4'), ('i', 'f4')])
    for i, name in enumerate('xyz'):
        structured[name] = cloud[:, i]
    np.save(tmp_path / 's.npy', structured)
    np.testing.assert_array_equal(read_points(tmp_path / 's.npy'), cloud)
    np.save(tmp_path / 'flat.npy', cloud[:, 0])
    with pytest.raises(UserError, match='flat.npy'):
        read_points(tmp_path / 'flat.npy')


@pytest.mark.parametrize(('name', 'content', 'message'), [
    ('missing.ply', None, 'not found'),
    ('scan.xyz', b'1 2 3', 'unsupported point cloud format'),
    ('text.ply', b'hello', 'not a PLY file'),
    ('noend.ply', b'ply\nformat ascii 1.0\nelement vertex 1\n', 'end_header'),
    ('noxyz.ply', b'ply\nformat ascii 1.0\nelement vertex 1\nproperty float a\nend_header\n1\n',
     'no property'),
    ('short.ply', b'ply\nformat ascii 1.0\nelement vertex 2\nproperty float x\nproperty float y\n'
     b'property float z\nend_header\n1 2 3\n', 'truncated PLY'),
    ('word.pcd', b'VERSION 0.7\nFIELDS x y z\nSIZE 4 4 4\nTYPE F F F\nPOINTS 1\nDATA ascii\n'
     b'1 two 3\n', 'bad number'),
    ('nodata.pcd', b'VERSION 0.7\nFIELDS x y z\n', 'not a PCD file'),
    ('pickle.npy', b'\x93NUMPY\x01\x00v\x00{"descr": "|O", "fortran_order": False, '
     b'"shape": (1,), }' + b' ' * 60 + b'\n', 'not a readable .npy'),
])
def test_unreadable_files_raise_one_clear_line(tmp_path: Path, name: str, content: bytes | None,
                                               message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        read_points(path)
    assert name in str(info.value) and '\n' not in str(info.value)


def _pcd(fields: str, size: str, kind: str, count: str, points: str, body: bytes) -> bytes:
    return (f'VERSION 0.7\nFIELDS {fields}\nSIZE {size}\nTYPE {kind}\nCOUNT {count}\n'
            f'WIDTH 1\nHEIGHT 1\nPOINTS {points}\nDATA binary\n').encode() + body


def _npy(dtype: list) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, np.zeros(4, dtype=dtype))
    return buffer.getvalue()


# The six file shapes an independent probe found unchecked (issue 17): each was a traceback.
UNCHECKED_SHAPES = [
    ('twice.ply', b'ply\nformat binary_little_endian 1.0\nelement vertex 1\nproperty float x\n'
     b'property float x\nproperty float y\nproperty float z\nend_header\n' + bytes(16),
     "property 'x' is declared more than once"),
    ('f1.pcd', _pcd('x y z', '1 1 1', 'F F F', '1 1 1', '1', bytes(3)), 'TYPE F SIZE 1'),
    ('minus.pcd', _pcd('x y z', '4 4 4', 'F F F', '1 1 1', '-1', bytes(12)),
     'announces -1 points'),
    ('count0.pcd', _pcd('x y z i', '4 4 4 4', 'F F F F', '1 1 1 0', '1', bytes(12)),
     "field 'i' has COUNT 0"),
    ('xcount.pcd', _pcd('x y z', '4 4 4', 'F F F', '3 1 1', '1', bytes(20)),
     'x, y and z need COUNT 1'),
    ('strings.npy', _npy([('x', 'U8'), ('y', 'f4'), ('z', 'f4')]), "field 'x' is <U8"),
    ('subarray.npy', _npy([('x', 'f4', (3,)), ('y', 'f4'), ('z', 'f4')]),
     r"field 'x' is <f4 \(3,\)"),
]


@pytest.mark.parametrize(('name', 'content', 'message'), UNCHECKED_SHAPES,
                         ids=[case[0] for case in UNCHECKED_SHAPES])
def test_unchecked_file_shapes_give_one_line(tmp_path: Path, name: str, content: bytes,
                                             message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=message) as info:
        read_points(path)
    assert name in str(info.value) and '\n' not in str(info.value)


def test_write_refuses_bad_targets(tmp_path: Path, cloud: np.ndarray) -> None:
    with pytest.raises(UserError, match='cannot write'):
        write_points(tmp_path / 'out.las', cloud)
    with pytest.raises(UserError, match='does not exist'):
        write_points(tmp_path / 'nope' / 'out.ply', cloud)


def test_real_scan_files(shared_data: Path) -> None:
    ply = read_points(shared_data / 'real_scans' / 'semantickitti_000123.ply')
    assert ply.shape == (125773, 3) and np.isfinite(ply).all()
    kitti = read_points(shared_data / 'kitti_seq00_subset' / 'velodyne' / '000094.bin')
    assert 100_000 < len(kitti) < 130_000
    assert -2.5 < np.median(kitti[:, 2]) < 1.0



def test_atomic_writer_creates_missing_folders_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / 'new' / 'deeper' / 'figure.png'
    with atomic_writer(target) as handle:
        handle.write(b'png bytes')
    assert target.read_bytes() == b'png bytes'
    assert [p.name for p in target.parent.iterdir()] == ['figure.png']
