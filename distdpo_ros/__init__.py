"""distdpo_ros: few-step diffusion scene completion for LiDAR scans (runtime and ROS 2 node).

The one API everything uses is :class:`distdpo_ros.completion.Completer`. Importing this
package never needs rclpy; the node lives in :mod:`distdpo_ros.node`.
"""

__version__ = '0.1.0'
