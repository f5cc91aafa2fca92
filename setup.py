"""distdpo_ros: few-step diffusion LiDAR scene completion as a ROS 2 (ament_python) package."""
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = 'distdpo_ros'
HERE = Path(__file__).resolve().parent  # colcon runs setup.py from its build folder

setup(
    name=PACKAGE,
    version='0.1.0',
    description='Distillation-DPO LiDAR scene completion: a ROS 2 node, CLI and training pipeline',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    license='MIT',
    python_requires='>=3.10',
    # The vehicle runtime at the root, the offline pipeline in training/distdpo_training/ (folder
    # = import name; training/ only holds it, beside its recipes).
    packages=find_packages(include=['distdpo_ros', 'distdpo_ros.*'])
    + find_packages('training', include=['distdpo_training', 'distdpo_training.*']),
    package_dir={'distdpo_training': 'training/distdpo_training'},
    package_data={
        'distdpo_ros': ['default_models/*/*.json', 'default_models/*/*.safetensors'],
        'distdpo_training': ['configs/*.yaml'],
    },
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + PACKAGE]),
        ('share/' + PACKAGE, ['package.xml']),
        ('share/' + PACKAGE + '/launch', glob('launch/*.launch.py')),
        ('share/' + PACKAGE + '/config', glob('config/*.yaml') + glob('config/*.rviz')),
    ],
    install_requires=[
        'numpy>=1.24',
        'torch>=2.1',
        'safetensors>=0.4',
        'scipy>=1.10',
        'pyyaml>=6',
        'tqdm>=4.60',
    ],
    extras_require={
        # ROS 2 from PyPI wheels, for machines without ROS (on a robot rclpy comes from ROS).
        'ros': [
            'ros-kilted-rclpy[fastrtps]',
            'ros-kilted-sensor-msgs',
            'ros-kilted-std-msgs',
            'ros-kilted-geometry-msgs',
            'ros-kilted-diagnostic-msgs',
        ],
        # Offline work: simulator, bags, evaluation pictures, training logs.
        'train': ['open3d-cpu>=0.18', 'rosbags>=0.10', 'matplotlib>=3.7', 'tensorboard>=2.14'],
        # colcon: the test that builds the package in a workspace (it skips without colcon)
        'test': ['pytest>=8,<9', 'diffusers>=0.27', 'ruff>=0.6', 'colcon-common-extensions'],
    },
    zip_safe=False,
    entry_points={
        'console_scripts': [
            'distdpo = distdpo_ros.cli:main',
            'completion_node = distdpo_ros.node:main',
        ],
    },
)
