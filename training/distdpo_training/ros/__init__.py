"""ROS 2 tools of the offline half: bag replay through the completion node, and the demo."""
